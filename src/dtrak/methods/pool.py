"""Methods that read retrained models: empirical influence, datamodels, TRAK ensembles.

They read the run's attribution pool (``RUN/pool``): models retrained on random half subsets
drawn apart from the LDS subsets (subset m with ``random_state = 10_000 + 2m``; the LDS uses
``lds.seed_base + 2m``, 42 by default), ``lds.n_subsets`` of them, each trained with every
seed of ``lds.seeds`` by the LDS recipe (including ``train.common_init``). The stages train
the pool and write its loss tables before these methods score (:mod:`dtrak.stages.pools`,
from each method's :class:`~dtrak.methods.base.PoolNeed`); a method only reads them.

- Empirical influence and datamodels: a pool model's output on a target is L_Simple computed
  exactly as the LDS ground truth; outputs are averaged over seeds. The datamodel's ridge
  alpha is chosen by leave-one-out error (``sklearn.linear_model.RidgeCV``) over
  :data:`DATAMODEL_ALPHAS`; with fewer than 4 pool subsets it is ``M / 4`` (the diagonal of
  the centred mask Gram).
- Ensembles (``trak-ensemble``, ``dtrak-ensemble``): the first 8 subsets' models (first
  seed); each has its own projection and kernel, and gets the same lambda relative to its
  own kernel scale; the scores are averaged (TRAK's ensembling). ``trak-ensemble-<n>`` and
  ``dtrak-ensemble-<n>`` take the first n models (the ensemble-size ablation).
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
from sklearn.linear_model import RidgeCV

from .. import scoring
from ..artefacts import load_npy
from .base import Context, Method, PoolNeed

log = logging.getLogger(__name__)

__all__ = ["DATAMODEL_ALPHAS", "ENSEMBLE_SIZE", "METHODS", "build", "datamodel_alpha",
           "pool_table"]

#: Ridge alphas the datamodel chooses from by leave-one-out error: 10^-2 .. 10^4.
DATAMODEL_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))
#: Models in a TRAK ensemble (the paper compares one D-TRAK model with 8 TRAK models).
ENSEMBLE_SIZE = 8


def pool_table(ctx: Context, set_name: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [M, N] bool, outputs [M, T])``: the pool's subsets and its models' losses on the
    targets, averaged over seeds, as the stages saved them."""
    if ctx.paths is None:
        raise ValueError(f"method {name} reads retrained models, so it needs a run directory; "
                         "score it through a run (`dtrak score --out RUN`)")
    masks_path, truth_path = ctx.paths.pool / "masks.npy", ctx.paths.pool_truth(set_name)
    done_path = truth_path.with_name(f"{set_name}.done.npy")
    if not (masks_path.exists() and truth_path.exists() and done_path.exists()
            and load_npy(done_path).all()):
        raise FileNotFoundError(
            f"method {name} needs the pool models' losses on {set_name} ({truth_path}); the "
            f"score stage trains the pool first: `dtrak score --out {ctx.paths.root} "
            f"--method {name}`")
    truth = load_npy(truth_path)
    n_targets = ctx.examples(set_name).shape[0]
    if truth.shape[-1] != n_targets:
        raise ValueError(f"{truth_path} has losses on {truth.shape[-1]} targets, the run has "
                         f"{n_targets}; rerun the score stage (it recomputes the table)")
    return load_npy(masks_path), truth.mean(axis=0)


def datamodel_alpha(masks: np.ndarray, outputs: np.ndarray) -> float:
    """The datamodel ridge alpha: leave-one-out best of :data:`DATAMODEL_ALPHAS`.

    One alpha for all targets (``RidgeCV``, mean LOO squared error); with fewer than 4
    models there is too little to validate on and ``M / 4`` is used.
    """
    n_models = masks.shape[0]
    if n_models < 4:
        return n_models / 4
    fit = RidgeCV(alphas=DATAMODEL_ALPHAS, fit_intercept=True)
    fit.fit(masks.astype(np.float64), np.asarray(outputs, dtype=np.float64))
    return float(fit.alpha_)


def _empirical(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    masks, outputs = pool_table(ctx, set_name, "empirical-influence")
    return scoring.empirical_influence(masks, outputs)


def _datamodel(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    masks, outputs = pool_table(ctx, set_name, "datamodel")
    alpha = datamodel_alpha(masks, outputs)
    log.info("datamodel %s: ridge alpha %.3g (leave-one-out over %d pool subsets)",
             set_name, alpha, masks.shape[0])
    info = ctx.paths.pool / f"datamodel-{set_name}.json"
    info.write_text(json.dumps({"ridge_alpha": alpha, "alphas": list(DATAMODEL_ALPHAS),
                                "n_models": int(masks.shape[0])}, indent=2))
    return scoring.datamodel_scores(masks, outputs, alpha)


def _ensemble(name: str, output: str, n_models: int) -> Method:
    def score(ctx: Context, set_name: str, lam: float) -> np.ndarray:
        # lam is absolute on the full model's kernel scale: each member gets the same lambda
        # relative to its own scale trace(Phi_m^T Phi_m)/N
        rel = lam / ctx.solver(output).trace_scale
        total = None
        for i in range(n_models):
            mid = f"pool-m{i:03d}"
            phi_t = ctx.features(set_name, output, model_id=mid)
            solver = ctx.solver(output, model_id=mid)
            s = solver.scores(phi_t, rel * solver.trace_scale).astype(np.float64)
            total = s if total is None else total + s
        return (total / n_models).astype(np.float32)

    return Method(name, f"mean of the {output} kernel scores of {n_models} models trained on "
                  "pool half subsets (a TRAK-style ensemble; each model its own projection)",
                  "as the kernel: positive = up-weighting z lowers the target's output",
                  score, uses_lambda=True, outputs=(output,), output=output,
                  pool=PoolNeed(members=n_models))


METHODS: tuple[Method, ...] = (
    Method("empirical-influence", "empirical influence: mean loss of pool models trained "
           "without z minus with z (pool: lds.n_subsets half subsets apart from the LDS "
           "ones, lds.seeds each)",
           "outputs are losses: positive = models that include z have a lower loss on "
           "the target (helps)", _empirical, pool=PoolNeed(losses=True)),
    Method("datamodel", "linear datamodel: ridge regression of pool models' losses on "
           "the inclusion mask (alpha by leave-one-out), minus the coefficient",
           "the coefficient of z is the loss change from including z; the score is minus "
           "it (positive = including z lowers the loss = helps)", _datamodel,
           pool=PoolNeed(losses=True)),
    _ensemble("trak-ensemble", "loss", ENSEMBLE_SIZE),
    _ensemble("dtrak-ensemble", "square", ENSEMBLE_SIZE),
)

_ENSEMBLE_NAME = re.compile(r"(d?trak)-ensemble-(\d+)$")


def build(name: str) -> Method | None:
    """``trak-ensemble-<n>`` / ``dtrak-ensemble-<n>``: the ensemble of the first n models."""
    m = _ENSEMBLE_NAME.match(name)
    if m is None or int(m.group(2)) < 1:
        return None
    return _ensemble(name, "loss" if m.group(1) == "trak" else "square", int(m.group(2)))


build.patterns = ("trak-ensemble-<n>", "dtrak-ensemble-<n>")
