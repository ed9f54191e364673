"""The score stage: score matrices ``[targets, train]`` per method and target set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..lambdas import chosen_lambdas
from ..methods import Method, default_lambda, get_method
from .pools import ensure_pool
from .run import Run

__all__ = ["score_method", "stage_score", "write_scores"]


def score_method(run: Run, method: Method, set_name: str, lam: float | None) -> np.ndarray:
    """``method``'s scores of a target set, after training the pool models it reads."""
    ensure_pool(run, method, [set_name])
    return method.score(run.context, set_name, lam)


def write_scores(run: Run, method_name: str, set_name: str, scores: np.ndarray, meta: dict
                 ) -> Path:
    path = run.paths.scores(method_name, set_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, scores.astype(np.float32))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=float))
    return path


def stage_score(run: Run) -> dict:
    """Score matrices [targets, train] for each configured method and target set.

    Lambda: the one LDS selected on held-out targets when ``results/lds.json`` exists at the
    time a matrix is first computed, else the prior of :func:`dtrak.methods.default_lambda`;
    the choice is recorded in its ``.json``. Existing matrices are kept (delete one, or use
    ``--overwrite`` with a changed config, to recompute it).
    """
    ctx = run.context
    chosen = chosen_lambdas(run.paths.results / "lds.json")
    a = run.cfg.attribution
    out = {}
    for name in a.methods:
        method = get_method(name)
        for set_name in run.target_sets():
            if not method.applies_to(set_name):
                continue
            path = run.paths.scores(name, set_name)
            if path.exists():  # done: later stages (counterfactual) rely on these exact scores
                out[f"{name}/{set_name}"] = str(path)
                continue
            lam = chosen.get((name, set_name))
            how = "lds-heldout" if lam is not None else "prior"
            if lam is None:
                lam = default_lambda(ctx, method)
            scores = score_method(run, method, set_name, lam)
            meta = {"method": name, "targets": set_name, "lambda": lam,
                    "lambda_selection": how if method.uses_lambda else None,
                    "shape": list(scores.shape),
                    "n_timesteps": method.n_timesteps or a.n_timesteps,
                    "timesteps": a.timesteps, "proj_dim": a.proj_dim, "projector": a.projector,
                    "outputs": list(method.outputs), "sign": method.sign}
            path = write_scores(run, name, set_name, scores, meta)
            out[f"{name}/{set_name}"] = str(path)
    return out
