"""The score stage: score matrices ``[targets, train]`` per method and target set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..artefacts import digest, load_npy, save_json, save_npy
from ..config import to_dict
from ..lambdas import chosen_lambdas
from ..methods import Method, default_lambda, get_method
from .pools import ensure_pool
from .run import RESULT_NEUTRAL_KEYS, Run

__all__ = ["saved_scores", "score_method", "scores_source", "stage_score", "write_scores"]

log = logging.getLogger(__name__)


def score_method(run: Run, method: Method, set_name: str, lam: float | None) -> np.ndarray:
    """``method``'s scores of a target set, after training the pool models it reads."""
    ensure_pool(run, method, [set_name])
    return method.score(run.context, set_name, lam)


def scores_source(run: Run, method: Method, set_name: str) -> str:
    """A digest of what a score matrix is made from: the config sections it depends on (the
    pool's ``lds`` section for methods that read retrained models, ``sampling`` for generated
    targets, the method's own sections such as ``das``), the model dtype and the target
    images themselves."""
    sections = ["data", "model", "train", "attribution"]
    sections += ["sampling"] if set_name == "gen" else []
    sections += ["lds"] if method.pool is not None else []
    sections += list(method.config)
    cfg = {s: {k: v for k, v in to_dict(getattr(run.cfg, s)).items()
               if f"{s}.{k}" not in RESULT_NEUTRAL_KEYS} for s in sections}
    return digest(cfg, run.cfg.runtime.dtype, run.context.examples(set_name))


def saved_scores(run: Run, method: Method, set_name: str) -> np.ndarray | None:
    """The saved scores of ``method`` on a target set, or None when there are none or they
    were made from something else (then they are deleted, with a warning)."""
    path = run.paths.scores(method.name, set_name)
    if not path.exists():
        return None
    meta_path = path.with_suffix(".json")
    made_from = json.loads(meta_path.read_text()).get("made_from") if meta_path.exists() else None
    # matrices written before sources were recorded are kept as they are
    if made_from is not None and made_from != scores_source(run, method, set_name):
        log.warning("%s was made from other inputs (config, pool or targets changed); "
                    "recomputing it", path)
        path.unlink()
        meta_path.unlink()
        return None
    return load_npy(path)


def write_scores(run: Run, method_name: str, set_name: str, scores: np.ndarray, meta: dict
                 ) -> Path:
    """Save a score matrix and its metadata, with the digest of what it was made from."""
    meta = {**meta, "made_from": scores_source(run, get_method(method_name), set_name)}
    path = run.paths.scores(method_name, set_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, scores.astype(np.float32))
    save_json(path.with_suffix(".json"), meta)
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
            if saved_scores(run, method, set_name) is not None:
                # done: later stages (counterfactual) rely on these exact scores
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
