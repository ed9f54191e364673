"""Tests of dtrak.scoring: kernel solver vs the np.linalg.solve oracle, methods, registry."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from dtrak.lambdas import PAPER_LAMBDAS, RELATIVE_LAMBDAS, lambda_grid
from dtrak.scoring import (
    KernelSolver,
    cosine_scores,
    datamodel_scores,
    dot_scores,
    empirical_influence,
    ensemble_average,
    random_scores,
    relative_influence,
    renormalized_influence,
    solve_reference,
    tracin_scores,
    trak_scores,
)


def _features(n: int, k: int, m: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)), rng.standard_normal((m, k))


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# --- lambda grids ------------------------------------------------------------------------------


def test_paper_lambdas_are_the_papers_grid():
    assert len(PAPER_LAMBDAS) == 27
    assert min(PAPER_LAMBDAS) == pytest.approx(0.01) and max(PAPER_LAMBDAS) == pytest.approx(5e6)
    assert {1.0, 2.0, 5.0, 1e6, 2e6} <= {round(v, 10) for v in PAPER_LAMBDAS}
    np.testing.assert_allclose(lambda_grid("absolute"), sorted(PAPER_LAMBDAS))
    np.testing.assert_allclose(lambda_grid("paper"), sorted(PAPER_LAMBDAS))


def test_relative_grid_scales_with_trace():
    grid = lambda_grid("relative", trace_scale=3.0)
    np.testing.assert_allclose(grid, 3.0 * np.array(sorted(RELATIVE_LAMBDAS)))
    assert len(grid) == 30 and grid[0] == pytest.approx(3e-6) and grid[-1] == pytest.approx(15000.0)
    np.testing.assert_allclose(
        lambda_grid("relative", trace_scale=2.0, exponents=[-1], mantissas=[1.0]), [0.2]
    )
    with pytest.raises(ValueError, match="trace_scale"):
        lambda_grid("relative")
    with pytest.raises(ValueError, match="unknown lambda scale"):
        lambda_grid("log")


# --- kernel solver -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(12, 30), (30, 12), (16, 16)])
@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_solver_matches_reference(n, k, form):
    phi, targets = _features(n, k)
    solver = KernelSolver(phi, form=form)
    for lam in (1e-3, 0.7, 50.0):
        out = solver.scores(targets, lam)
        assert out.shape == (5, n) and out.dtype == np.float32
        _close(out, solve_reference(phi, targets, lam), rtol=1e-4)


def test_auto_picks_the_smaller_gram():
    assert KernelSolver(np.ones((10, 4)) + np.eye(10, 4)).form == "primal"
    assert KernelSolver(np.ones((4, 10)) + np.eye(4, 10)).form == "dual"
    solver = KernelSolver(_features(8, 20)[0])
    assert (solver.n, solver.k, solver.rank_dim) == (8, 20, 8)


def test_trace_scale():
    phi, _ = _features(9, 6)
    assert KernelSolver(phi).trace_scale == pytest.approx(np.trace(phi.T @ phi) / 9)


def test_lambda_zero_needs_full_rank():
    phi, targets = _features(6, 15)  # N < k: the primal Gram has k - N zero eigenvalues
    with pytest.raises(ValueError, match="zero eigenvalue"):
        KernelSolver(phi, form="primal").scores(targets, 0.0)
    # The dual Gram is full rank: lambda = 0 is the pseudo-inverse limit.
    dual = KernelSolver(phi, form="dual")
    _close(dual.scores(targets, 0.0), targets @ np.linalg.pinv(phi), rtol=1e-6)
    tall, t2 = _features(15, 6)  # N > k: the primal Gram is full rank
    _close(KernelSolver(tall).scores(t2, 0.0), solve_reference(tall, t2, 0.0), rtol=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        dual.scores(targets, -1.0)


def test_input_validation():
    phi, targets = _features(6, 5)
    with pytest.raises(ValueError, match="2-D"):
        KernelSolver(phi[0])
    with pytest.raises(ValueError, match="NaN"):
        KernelSolver(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="form"):
        KernelSolver(phi, form="svd")
    with pytest.raises(ValueError, match="same projector"):
        KernelSolver(phi).scores(targets[:, :4], 1.0)


@pytest.mark.parametrize("n,k", [(10, 25), (25, 10)])
def test_sweep_equals_per_lambda_solves(n, k):
    phi, targets = _features(n, k)
    solver = KernelSolver(phi)
    lams = [0.01, 1.0, 100.0]
    swept = solver.sweep(targets, lams)
    assert swept.shape == (3, 5, n) and swept.dtype == np.float32
    for i, lam in enumerate(lams):
        _close(swept[i], solve_reference(phi, targets, lam), rtol=1e-4)
    for (lam, s), ref_lam, ref in zip(solver.iter_sweep(targets, lams), lams, swept, strict=True):
        assert lam == ref_lam
        np.testing.assert_array_equal(s, ref)


@pytest.mark.parametrize("n,k", [(10, 25), (25, 10)])
def test_predicted_outputs_sweep_equals_summing_scores(n, k):
    phi, targets = _features(n, k)
    solver = KernelSolver(phi)
    masks = np.random.default_rng(1).random((6, n)) < 0.5
    lams = [0.01, 1.0]
    got = solver.predicted_outputs_sweep(targets, lams, masks)
    assert got.shape == (2, 6, 5)
    for i, lam in enumerate(lams):
        ref = -(masks @ solve_reference(phi, targets, lam).astype(np.float64).T)
        _close(got[i], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="bool"):
        solver.predicted_outputs_sweep(targets, lams, masks[:, :3])


def test_scores_blocks_cover_all_targets():
    phi, targets = _features(10, 7, m=11)
    solver = KernelSolver(phi)
    blocks = list(solver.scores_blocks(targets, 0.5, block_size=4))
    assert [(a, b) for a, b, _ in blocks] == [(0, 4), (4, 8), (8, 11)]
    _close(np.concatenate([s for *_, s in blocks]), solver.scores(targets, 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        next(solver.scores_blocks(targets, 0.5, block_size=0))


@pytest.mark.parametrize("n,k", [(10, 25), (25, 10)])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_influence_and_feature_norms_match_direct(n, k, form):
    phi, _ = _features(n, k)
    solver = KernelSolver(phi, form=form)
    lam = 0.3
    direct = np.linalg.solve(phi.T @ phi + lam * np.eye(k), phi.T).T  # rows (G + lam)^-1 phi_z
    _close(solver.influence_norms(lam), np.linalg.norm(direct, axis=1), rtol=1e-6)
    _close(solver.feature_norms(), np.linalg.norm(phi, axis=1), rtol=1e-6)


# --- methods -----------------------------------------------------------------------------------


def test_relative_and_renormalized_influence_match_direct():
    phi, targets = _features(10, 25)
    solver = KernelSolver(phi)
    lam = 0.3
    ref = solve_reference(phi, targets, lam).astype(np.float64)
    inv_phi = np.linalg.solve(phi.T @ phi + lam * np.eye(25), phi.T).T
    _close(relative_influence(solver, targets, lam), ref / np.linalg.norm(inv_phi, axis=1), 1e-4)
    expected = ref / np.linalg.norm(phi, axis=1)
    _close(renormalized_influence(solver, targets, lam, phi), expected, 1e-4)
    _close(renormalized_influence(solver, targets, lam), expected, 1e-4)
    _close(trak_scores(solver, targets, lam), ref, 1e-4)
    with pytest.raises(ValueError, match="same training features"):
        renormalized_influence(solver, targets, lam, phi[:5])


def test_random_scores_are_seeded():
    a, b = random_scores(3, 4, seed=1), random_scores(3, 4, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4) and a.dtype == np.float32
    assert not np.array_equal(a, random_scores(3, 4, seed=2))


def test_dot_and_cosine():
    a, b = _features(4, 6, m=3)
    _close(dot_scores(b, a), b @ a.T, 1e-6)
    cos = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (
        a / np.linalg.norm(a, axis=1)[:, None]
    ).T
    _close(cosine_scores(b, a), cos, 1e-6)
    a[1] = 0.0
    assert np.all(cosine_scores(b, a)[:, 1] == 0)
    with pytest.raises(ValueError, match="same feature extractor"):
        dot_scores(b[:, :3], a)


def test_tracin_and_ensemble_average():
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((3, 5)), rng.standard_normal((4, 5))) for _ in range(4)]
    _close(tracin_scores(pairs), np.mean([t @ z.T for t, z in pairs], axis=0), 1e-6)
    _close(
        tracin_scores(pairs, cosine=True),
        np.mean([cosine_scores(t, z) for t, z in pairs], axis=0),
        1e-6,
    )
    mats = [rng.standard_normal((3, 4)) for _ in range(3)]
    _close(ensemble_average(mats), np.mean(mats, axis=0), 1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_average([mats[0], mats[0][:2]])
    with pytest.raises(ValueError, match="at least one"):
        tracin_scores([])


def _linear_datamodel(n_models: int, n_train: int, n_targets: int, seed: int = 0):
    """Losses y = b - masks @ beta^T + noise: beta[t, z] is z's true help on target t."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_train)) < 0.5
    beta = rng.standard_normal((n_targets, n_train))
    y = 3.0 - masks @ beta.T + 0.1 * rng.standard_normal((n_models, n_targets))
    return masks, y, beta


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def test_empirical_influence_recovers_true_effects():
    masks, y, beta = _linear_datamodel(400, 12, 3)
    infl = empirical_influence(masks, y)
    assert infl.shape == (3, 12) and infl.dtype == np.float32
    assert np.all(np.sign(infl[np.abs(beta) > 0.5]) == np.sign(beta[np.abs(beta) > 0.5]))
    assert _rank_corr(infl, beta) > 0.8


def test_empirical_influence_undefined_columns_are_zero(caplog):
    masks, y, _ = _linear_datamodel(50, 6, 2)
    masks[:, 0], masks[:, 1] = True, False
    with caplog.at_level(logging.WARNING):
        infl = empirical_influence(masks, y)
    assert np.all(infl[:, :2] == 0) and "2 training example(s)" in caplog.text
    with pytest.raises(ValueError, match="bool"):
        empirical_influence(masks.astype(int), y)
    with pytest.raises(ValueError, match="rows"):
        empirical_influence(masks, y[:10])


def test_datamodels_recover_true_effects():
    masks, y, beta = _linear_datamodel(300, 12, 3)
    dm = datamodel_scores(masks, y, ridge_alpha=1.0)
    assert dm.shape == (3, 12)
    strong = np.abs(beta) > 0.2
    assert np.all(np.sign(dm[strong]) == np.sign(beta[strong]))
    assert _rank_corr(dm, beta) > 0.95


@pytest.mark.parametrize("n_models,n_train", [(40, 10), (10, 40)])
def test_datamodels_match_sklearn_ridge(n_models, n_train):
    masks, y, _ = _linear_datamodel(n_models, n_train, 3)
    ref = Ridge(alpha=2.0, fit_intercept=True).fit(masks.astype(float), y).coef_
    _close(datamodel_scores(masks, y, ridge_alpha=2.0), -ref, rtol=1e-5)
    with pytest.raises(ValueError, match="ridge_alpha"):
        datamodel_scores(masks, y, ridge_alpha=-1.0)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_torch_factorisation_equals_scipy(form):
    # the device path (torch float64 Gram + eigh; on a GPU in the device check) on the CPU
    rng = np.random.default_rng(0)
    phi, tgt = rng.normal(size=(40, 24)), rng.normal(size=(3, 24))
    ref = KernelSolver(phi, form=form)
    dev = KernelSolver(phi, form=form, device="cpu")
    np.testing.assert_allclose(dev.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dev.scores(tgt, 0.3), ref.scores(tgt, 0.3), rtol=1e-5, atol=1e-6)
    assert dev.trace_scale == pytest.approx(ref.trace_scale)
