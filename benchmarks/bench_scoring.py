"""Benchmark of dtrak.scoring / dtrak.lds fast paths against their plain references.

One run measures, on synthetic Gaussian features:

1. primal (k x k) vs dual (N x N) factorisation of KernelSolver, plus scoring M targets at one
   lambda, at paper-like sizes; records which form ``form="auto"`` picks and whether it is the
   faster one. Where a form cannot run here (the k = 32768 primal Gram alone is 8.6 GB and its
   eigh O(k^3)) its time is *estimated*, as a lower bound: a measured 2048 x 2048 eigh scaled
   by (k / 2048)^3 (the Gram product and basis change are left out), and marked "(est)".
2. the 27-lambda paper sweep (one factorisation) vs 27 separate ``solve_reference`` calls,
   at a size where the reference finishes in about a minute on one core; and the LDS
   predictions of 64 subsets at the 27 lambdas straight from the factorisation
   (``predicted_outputs_sweep``) vs materialising the scores and summing them.
3. the LDS bootstrap (1000 resamples of M = 64 subsets, T = 1000 targets): the sort-free
   matrix-product path vs ranking every resample with ``scipy.stats.rankdata``.

0. (why KernelSolver calls eigh with driver="evd") scipy's default MRRR driver vs divide and
   conquer, on a full-rank and a rank-deficient Gram.

Every comparison also checks that both paths agree. Single runs (no repeats): the machine is
shared, so treat ratios as +-20%.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=src \\
        python benchmarks/bench_scoring.py --out benchmarks/scoring_results.json

``--quick`` runs tiny sizes (a smoke test of the script, seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
from scipy.stats import rankdata

from dtrak import lds as lds_mod
from dtrak import scoring
from dtrak.lambdas import PAPER_LAMBDAS, predictions_by_lambda
from dtrak.scoring import KernelSolver, choose_form, solve_reference


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _features(n: int, k: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, k), dtype=np.float32),
        rng.standard_normal((m, k), dtype=np.float32),
    )


def _solve_form(phi: np.ndarray, targets: np.ndarray, form: str, lam: float) -> dict:
    t_fact, solver = _timed(lambda: KernelSolver(phi, form=form))
    t_score, scores = _timed(lambda: solver.scores(targets, lam))
    return {
        "factorise_s": t_fact,
        "score_s": t_score,
        "total_s": t_fact + t_score,
        "scores": scores,
    }


def _eigh_seconds(size: int) -> float:
    """Time of one float64 eigh of a ``size x size`` SPD matrix."""
    a = np.random.default_rng(3).standard_normal((size, size))
    gram = a @ a.T
    t_eigh, _ = _timed(lambda: scoring.eigh_gram(gram))
    return t_eigh


def bench_eigh_drivers(size: int, ranks: list[int]) -> list[dict]:
    """scipy eigh drivers ``evr`` (scipy's default, MRRR) vs ``evd`` (divide and conquer)."""
    rows = []
    for rank in ranks:
        a = np.random.default_rng(4).standard_normal((size, rank))
        gram = a @ a.T
        row = {"size": size, "rank": rank}
        for driver in ("evr", "evd"):
            row[f"{driver}_s"], _ = _timed(lambda d=driver, g=gram: scipy.linalg.eigh(g, driver=d))
        rows.append(row)
    return rows


def bench_forms(cases: list[tuple[int, int, bool]], n_targets: int, eigh_size: int) -> list[dict]:
    """Primal vs dual at each (N, k); ``run_primal=False`` estimates the primal instead.

    The estimate is a lower bound: the eigh alone, ``t_eigh(eigh_size) * (k / eigh_size)^3``.
    """
    rows, t_ref_eigh = [], None
    for n, k, run_primal in cases:
        phi, targets = _features(n, k, n_targets)
        lam = 0.1 * float(np.mean(np.sum(phi.astype(np.float64) ** 2, axis=1)))
        dual = _solve_form(phi, targets, "dual", lam)
        row = {"N": n, "k": k, "M": n_targets, "dual_s": dual["total_s"]}
        if run_primal:
            primal = _solve_form(phi, targets, "primal", lam)
            diff = _rel_err(primal["scores"], dual["scores"].astype(np.float64))
            row.update(primal_s=primal["total_s"], primal_estimated=False, max_rel_diff=diff)
        else:
            t_ref_eigh = t_ref_eigh or _eigh_seconds(eigh_size)
            row.update(
                primal_s=t_ref_eigh * (k / eigh_size) ** 3,
                primal_estimated=True,
                primal_gram_gb=k * k * 8 / 1e9,
                max_rel_diff=None,
            )
        row["auto_form"] = choose_form(n, k)
        row["faster_form"] = "primal" if row["primal_s"] < row["dual_s"] else "dual"
        slow, fast = sorted([row["primal_s"], row["dual_s"]], reverse=True)
        row["speedup_of_auto"] = slow / fast
        rows.append(row)
    return rows


def bench_sweep(n: int, k: int, n_targets: int) -> dict:
    """The paper's 27-lambda sweep vs 27 plain solves."""
    phi, targets = _features(n, k, n_targets, seed=1)
    lams = list(PAPER_LAMBDAS)
    t_sweep, swept = _timed(lambda: KernelSolver(phi).sweep(targets, lams))
    t_ref, refs = _timed(lambda: [solve_reference(phi, targets, lam) for lam in lams])
    err = max(_rel_err(s, r.astype(np.float64)) for s, r in zip(swept, refs, strict=True))
    # LDS predictions for all lambdas: straight from the factorisation vs summing scores.
    masks = np.random.default_rng(5).random((64, n)) < 0.5
    t_pred, preds = _timed(lambda: KernelSolver(phi).predicted_outputs_sweep(targets, lams, masks))
    t_pred_ref, preds_ref = _timed(
        lambda: predictions_by_lambda(KernelSolver(phi).sweep(targets, lams), masks)
    )
    return {
        "predictions_s": t_pred,
        "predictions_via_scores_s": t_pred_ref,
        "predictions_speedup": t_pred_ref / t_pred,
        "predictions_max_rel_diff": _rel_err(preds, preds_ref),
        "N": n,
        "k": k,
        "M": n_targets,
        "n_lambdas": len(lams),
        "sweep_s": t_sweep,
        "reference_s": t_ref,
        "speedup": t_ref / t_sweep,
        "max_rel_diff": err,
    }


def _bootstrap_reference(pred: np.ndarray, actual: np.ndarray, n_boot: int, seed: int):
    """Rank every resample with scipy (chunked), mean Spearman per resample."""
    m, t = pred.shape
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    out = np.empty(n_boot)
    for s in range(0, n_boot, 32):
        sel = idx[s : s + 32]
        rho = lds_mod._pearson_axis(rankdata(pred[sel], axis=1), rankdata(actual[sel], axis=1), 1)
        out[s : s + 32] = np.nanmean(rho, axis=1)
    return out


def bench_bootstrap(m: int, t: int, n_boot: int) -> dict:
    rng = np.random.default_rng(2)
    actual = rng.standard_normal((m, t))
    pred = actual + rng.standard_normal((m, t))
    t_fast, fast = _timed(lambda: lds_mod._bootstrap_means(pred, actual, n_boot, seed=0))
    t_ref, ref = _timed(lambda: _bootstrap_reference(pred, actual, n_boot, seed=0))
    return {
        "M": m,
        "T": t,
        "n_boot": n_boot,
        "fast_s": t_fast,
        "reference_s": t_ref,
        "speedup": t_ref / t_fast,
        "max_abs_diff": float(np.abs(fast - ref).max()),
    }


def _print_tables(res: dict) -> None:
    print("0. eigh driver on a Gram (KernelSolver uses evd)")
    for r in res["eigh_drivers"]:
        print(
            f"   {r['size']} x {r['size']}, rank {r['rank']}: evr {r['evr_s']:.1f} s, "
            f"evd {r['evd_s']:.1f} s"
        )
    print("\n1. KernelSolver primal vs dual (factorise + score M targets)")
    print(
        f"{'N':>6} {'k':>6} {'M':>5} {'primal s':>12} {'dual s':>9} {'auto':>7} "
        f"{'faster':>7} {'ratio':>8} {'max rel diff':>13}"
    )
    for r in res["forms"]:
        p = f"{r['primal_s']:.1f}" + (" (est)" if r["primal_estimated"] else "")
        print(
            f"{r['N']:>6} {r['k']:>6} {r['M']:>5} {p:>12} {r['dual_s']:>9.2f} "
            f"{r['auto_form']:>7} {r['faster_form']:>7} {r['speedup_of_auto']:>7.1f}x "
            f"{'-' if r['max_rel_diff'] is None else format(r['max_rel_diff'], '.1e'):>13}"
        )
    s = res["sweep"]
    print(
        f"\n2. {s['n_lambdas']}-lambda sweep, N={s['N']} k={s['k']} M={s['M']}: sweep "
        f"{s['sweep_s']:.1f} s vs {s['n_lambdas']} x solve_reference {s['reference_s']:.1f} s "
        f"-> {s['speedup']:.1f}x (max rel diff {s['max_rel_diff']:.1e})"
    )
    print(
        f"   LDS predictions of 64 subsets at {s['n_lambdas']} lambdas: predicted_outputs_sweep "
        f"{s['predictions_s']:.1f} s vs sweep + predicted_outputs "
        f"{s['predictions_via_scores_s']:.1f} s -> {s['predictions_speedup']:.1f}x "
        f"(max rel diff {s['predictions_max_rel_diff']:.1e})"
    )
    b = res["bootstrap"]
    print(
        f"\n3. LDS bootstrap, M={b['M']} T={b['T']} n_boot={b['n_boot']}: fast "
        f"{b['fast_s']:.1f} s vs rankdata {b['reference_s']:.1f} s -> {b['speedup']:.1f}x "
        f"(max abs diff {b['max_abs_diff']:.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    if args.quick:
        cases, n_targets, eigh_size = [(300, 200, True), (100, 2000, False)], 50, 256
        drivers = (256, [256, 100])
        sweep, boot = (200, 150, 50), (16, 50, 100)
    else:
        cases = [(5000, 4096, True), (1000, 32768, False), (1000, 4096, True)]
        n_targets, eigh_size = 1000, 2048
        drivers = (2048, [2048, 1000])
        sweep, boot = (2000, 2048, 500), (64, 1000, 1000)
    t0 = time.perf_counter()
    res = {
        "eigh_drivers": bench_eigh_drivers(*drivers),
        "forms": bench_forms(cases, n_targets, eigh_size),
        "sweep": bench_sweep(*sweep),
        "bootstrap": bench_bootstrap(*boot),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "quick": args.quick,
    }
    res["wall_s"] = time.perf_counter() - t0
    _print_tables(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
