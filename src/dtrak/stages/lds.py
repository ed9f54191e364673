"""The LDS stage: the LDS pool's models and ground truth, then the LDS of every method.

Steps, each resumable:
1. the LDS pool (:mod:`dtrak.stages.pools`): subset masks ``lds/masks.npy``, one model per
   (subset, seed) through the run's executor (``lds/jobs.json``), and the ground truth
   ``lds/truth/<targets>.npy`` ``[S, M, T]``;
2. LDS for each method and target set, with lambda chosen both ways (paper's best on the
   evaluated targets, and held out), the seed-to-seed ceiling, and ``results/lds.json``.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile

import numpy as np

from .. import lds as lds_math
from ..artefacts import DamagedArtefactError, load_npy
from ..config import to_dict
from ..lambdas import select_lambda
from ..methods import get_method, lambda_scale, method_lambda_grid
from .pools import ensure_pool, lds_pool, pool_losses, train_pool
from .run import Run

log = logging.getLogger(__name__)

__all__ = ["compare", "format_table", "stage_lds"]


def _evaluate(run: Run, name: str, set_name: str, masks, truth, preds_out: dict
              ) -> tuple[list, list]:
    """LDS records and lambda curves of one method on one target set.

    ``preds_out`` receives the predictions behind each record (``method/set/selection`` ->
    ``[M, T]``, and ``.../weights`` for held-out target weights): what
    :func:`dtrak.lds.difference` compares (``results/lds_predictions.npz``).
    """
    c, ctx = run.cfg.lds, run.context
    method = get_method(name)
    ensure_pool(run, method, [set_name])
    t0 = time.time()  # the method's own cost: features, factors and scores it computes here
    common = {"method": name, "targets": set_name, "n_subsets": int(masks.shape[0]),
              "n_targets": int(truth.shape[-1]), "n_seeds": int(truth.shape[0]),
              "n_timesteps": method.n_timesteps or run.cfg.attribution.n_timesteps,
              "proj_dim": run.cfg.attribution.proj_dim, "projector": run.cfg.attribution.projector}
    if not method.uses_lambda:
        scores = method.score(ctx, set_name, None)
        seconds = time.time() - t0
        res = lds_math.lds(scores, masks, truth, c.n_boot)
        preds_out[f"{name}/{set_name}/none"] = lds_math.predicted_outputs(scores, masks)
        return [{**common, **res.to_dict(), "lambda": None, "lambda_selection": None,
                 "seconds": seconds}], []
    lams = method_lambda_grid(ctx, method)
    scale = lambda_scale(ctx, method)
    if method.kernel:
        # the LDS predictions at every lambda straight from the factorisation, without
        # materialising the [L, T, N] score stack
        mctx, spec = method.context(ctx), method.spec(ctx)
        feats = mctx.features(set_name, method.output, spec=spec)
        solver = mctx.solver(method.output, spec=spec)
        scores, preds = None, solver.predicted_outputs_sweep(feats, lams, masks)
    else:
        scores, preds = np.stack([method.score(ctx, set_name, lam) for lam in lams]), None
    seconds = time.time() - t0
    records = []
    curve = None
    for mode in ("paper", "heldout"):
        sel = select_lambda(scores, lams, masks, truth, mode=mode, n_boot=c.n_boot,
                                     predictions=preds)
        preds_out[f"{name}/{set_name}/{mode}"] = sel["pred"]
        if sel["weights"] is not None:
            preds_out[f"{name}/{set_name}/{mode}/weights"] = sel["weights"]
        records.append({**common, "lds": sel["lds"], "ci_low": sel["ci_low"],
                        "ci_high": sel["ci_high"], "lambda": sel["lam"],
                        "lambda_rel": sel["lam"] / scale,
                        "lambda_selection": mode, "seconds": seconds,
                        **({"lambdas_heldout": sel["lams_heldout"]} if mode == "heldout" else {})})
        curve = {"method": name, "targets": set_name, "lambdas": sel["lams"],
                 "lds": sel["lds_by_lambda"]}
    return records, [curve]


def format_table(records: list[dict]) -> str:
    """A plain-text table: method x target set x lambda selection."""
    lines = [f"{'method':<22}{'targets':<8}{'lambda sel.':<12}{'LDS %':>8}  {'95% CI':<18}"
             f"{'lambda':>10}"]
    for r in records:
        lam = "" if r.get("lambda") is None else f"{r['lambda']:.3g}"
        ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(f"{r['method']:<22}{r['targets']:<8}{str(r.get('lambda_selection')):<12}"
                     f"{r['lds']:>8.2f}  {ci:<18}{lam:>10}")
    return "\n".join(lines)


def stage_lds(run: Run) -> dict:
    t0 = time.time()
    pool = lds_pool(run)
    jobs = train_pool(run, pool, desc="LDS models")
    masks = load_npy(pool.root / "masks.npy")
    records, curves, ceilings, predictions = [], [], [], {}
    for set_name in run.target_sets():
        truth = pool_losses(run, pool, jobs, set_name, run.context.examples(set_name))
        if truth.shape[0] >= 2:
            ceil = lds_math.seed_ceiling(truth, n_boot=run.cfg.lds.n_boot)
            ceilings.append({"targets": set_name, **ceil.to_dict(), "n_seeds": truth.shape[0]})
        for name in run.cfg.attribution.methods:
            if not get_method(name).applies_to(set_name):
                continue
            recs, crv = _evaluate(run, name, set_name, masks, truth, predictions)
            records += recs
            curves += crv
    settings = {"n_subsets": run.cfg.lds.n_subsets, "alpha": run.cfg.lds.alpha,
                "seeds": list(run.cfg.lds.seeds), "eval_timesteps": run.cfg.lds.eval_timesteps,
                "noise_seeds": list(run.cfg.lds.noise_seeds), "n_boot": run.cfg.lds.n_boot,
                "attribution": to_dict(run.cfg.attribution), "seconds": time.time() - t0}
    out = {"records": records, "lds_by_lambda": curves, "ceiling": ceilings,
           "settings": settings}
    run.paths.results.mkdir(parents=True, exist_ok=True)
    (run.paths.results / "lds.json").write_text(json.dumps(out, indent=2, default=float))
    np.savez(run.paths.results / "lds_predictions.npz", **predictions)
    table = format_table(records)
    (run.paths.results / "lds.txt").write_text(table + "\n")
    log.debug("LDS\n%s", table)
    return {"table": table.splitlines(), "ceiling": ceilings}


def compare(run: Run, method_a: str, method_b: str, set_name: str, selection: str = "heldout"
            ) -> dict:
    """LDS(a) - LDS(b) on one target set with a paired bootstrap interval (after the LDS stage).

    ``selection`` is the lambda choice of methods that have one (``paper`` or ``heldout``);
    methods without lambda use their single record.
    """
    path = run.paths.results / "lds_predictions.npz"
    if not path.exists():
        raise FileNotFoundError(f"no {path}; run the LDS stage first (dtrak lds --out "
                                f"{run.paths.root})")
    if selection not in ("paper", "heldout"):
        raise ValueError(f"selection must be paper or heldout, got {selection!r}")
    try:
        preds = np.load(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DamagedArtefactError(f"{path} is damaged ({e}); run `dtrak lds --out "
                                   f"{run.paths.root}` again to rewrite it") from e

    def key(name: str) -> str:
        for k in (f"{name}/{set_name}/{selection}", f"{name}/{set_name}/none"):
            if k in preds.files:
                return k
        have = sorted({k.split("/")[0] for k in preds.files if k.split("/")[1] == set_name})
        raise ValueError(f"no LDS of {name!r} on {set_name!r} targets in {path}; have: "
                         f"{', '.join(have)} (add the method and rerun dtrak lds)")

    ka, kb = key(method_a), key(method_b)
    weights = next((preds[k + "/weights"] for k in (ka, kb) if k + "/weights" in preds.files),
                   None)
    truth = load_npy(run.paths.truth(set_name))
    res = lds_math.difference(preds[ka], preds[kb], truth, weights, n_boot=run.cfg.lds.n_boot)
    return {"a": method_a, "b": method_b, "targets": set_name, "selection": selection, **res}
