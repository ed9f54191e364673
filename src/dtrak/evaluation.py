"""The LDS stage: subsets, the retraining farm, ground-truth losses, LDS per method.

Steps, each resumable:
1. masks ``[M, N]`` of the subsets (``lds/masks.npy``), reproducible from their seeds;
2. one model per (subset, seed) through the farm's job table (``lds/jobs.json``);
3. ground truth ``lds/truth/<targets>.npy`` ``[S, M, T]``: L_Simple of every subset model
   on every target, averaged over ``lds.eval_timesteps`` evenly spaced timesteps and the
   noise seeds; the same noise for every model (a done mask per model lets it resume);
4. LDS for each method and target set, with lambda chosen both ways (paper's best on the
   evaluated targets, and held out), the seed-to-seed ceiling, and ``results/lds.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import lds as lds_math
from .config import to_dict
from .farm import LocalExecutor, TrainJob, save_jobs
from .gradients import UNet2DAdapter, output_values
from .model import load_unet
from .noise import timesteps

log = logging.getLogger(__name__)

__all__ = ["lds_jobs", "ground_truth", "stage_lds", "format_table"]


def train_images_file(run) -> Path:
    """The training images as one ``.npy`` file that farm workers read."""
    path = run.paths.data / "train_images.npy"
    if not path.exists():
        run.paths.data.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, run.dataset.train.images.numpy())
        tmp.rename(path)
    return path


def subset_masks(run) -> np.ndarray:
    c = run.cfg.lds
    masks = lds_math.subset_masks(run.dataset.train.labels, c.n_subsets, c.alpha, c.seed_base)
    path = run.paths.lds / "masks.npy"
    if path.exists():
        if not np.array_equal(np.load(path), masks):
            raise ValueError(f"{path} differs from the masks of this config; use --overwrite")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, masks)
    return masks


def lds_jobs(run, masks: np.ndarray) -> list[TrainJob]:
    """One training job per (subset, seed), the full model's recipe on the subset.

    With ``train.common_init`` every job starts from the full model's initialisation and
    draws the same timestep/noise stream (common random numbers across subsets).
    """
    cfg = run.cfg
    images = str(train_images_file(run))
    common = cfg.train.common_init
    jobs = []
    for m in range(masks.shape[0]):
        idx = tuple(int(i) for i in np.flatnonzero(masks[m]))
        for s in cfg.lds.seeds:
            jobs.append(TrainJob(
                name=f"m{m:03d}-s{s}", directory=str(run.paths.lds_model(m, s)), images=images,
                indices=idx, model=to_dict(cfg.model), train=to_dict(cfg.train), seed=s,
                init_seed=cfg.train.seed + s if common else None,
                noise_seed=cfg.train.seed + s if common else None))
    return jobs


def ground_truth(run, jobs: list[TrainJob], set_name: str, targets: torch.Tensor
                 ) -> np.ndarray:
    """``[S, M, T]`` L_Simple of each subset model on each target (resumable per model)."""
    c = run.cfg.lds
    S, M = len(c.seeds), len(jobs) // len(c.seeds)
    path = run.paths.truth(set_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    done_path = path.with_name(f"{set_name}.done.npy")
    shape = (S, M, targets.shape[0])
    if path.exists() and np.load(path, mmap_mode="r").shape == shape:
        truth, done = np.load(path), np.load(done_path)
    else:
        truth, done = np.zeros(shape), np.zeros((S, M), dtype=bool)
    T = run.cfg.model.num_train_timesteps
    ts = timesteps("uniform", min(c.eval_timesteps, T), T)
    from .pipeline import context

    sched = context(run).sched
    ids = torch.arange(targets.shape[0])
    todo = [(si, m) for si in range(S) for m in range(M) if not done[si, m]]
    for si, m in tqdm(todo, desc=f"ground truth {set_name}", disable=not run.progress,
                      leave=False):
        model = load_unet(Path(jobs[m * S + si].directory) / "unet")
        adapter = UNet2DAdapter(model)
        vals = [output_values(adapter, targets, ids, "loss", ts, sched,
                              noise_seed=1_000_003 * (ns + 1), batch_size=512).mean(dim=1)
                for ns in c.noise_seeds]
        truth[si, m] = torch.stack(vals).mean(0).double().numpy()
        done[si, m] = True
        np.save(path, truth)
        np.save(done_path, done)
    return truth


def _evaluate(run, ctx, name: str, set_name: str, masks, truth, preds_out: dict
              ) -> tuple[list, list]:
    """LDS records and lambda curves of one method on one target set.

    ``preds_out`` receives the predictions behind each record (``method/set/selection`` ->
    ``[M, T]``, and ``.../weights`` for held-out target weights): what
    :func:`dtrak.lds.difference` compares (``results/lds_predictions.npz``).
    """
    from .methods import get_method, lambda_grid

    c = run.cfg.lds
    method = get_method(name)
    common = {"method": name, "targets": set_name, "n_subsets": int(masks.shape[0]),
              "n_targets": int(truth.shape[-1]), "n_seeds": int(truth.shape[0]),
              "n_timesteps": method.n_timesteps or run.cfg.attribution.n_timesteps,
              "proj_dim": run.cfg.attribution.proj_dim, "projector": run.cfg.attribution.projector}
    if not method.uses_lambda:
        scores = method.score(ctx, set_name, None)
        res = lds_math.lds(scores, masks, truth, c.n_boot)
        preds_out[f"{name}/{set_name}/none"] = lds_math.predicted_outputs(scores, masks)
        return [{**common, **res.to_dict(), "lambda": None, "lambda_selection": None}], []
    lams = lambda_grid(ctx, method)
    mctx = method.context(ctx)
    solver = mctx.solver(method.output)
    feats = mctx.features(set_name, method.output)
    if method.kernel:
        # the LDS predictions at every lambda straight from the factorisation, without
        # materialising the [L, T, N] score stack
        scores, preds = None, solver.predicted_outputs_sweep(feats, lams, masks)
    else:
        scores, preds = np.stack([method.score(ctx, set_name, lam) for lam in lams]), None
    records = []
    curve = None
    for mode in ("paper", "heldout"):
        sel = lds_math.select_lambda(scores, lams, masks, truth, mode=mode, n_boot=c.n_boot,
                                     predictions=preds)
        preds_out[f"{name}/{set_name}/{mode}"] = sel["pred"]
        if sel["weights"] is not None:
            preds_out[f"{name}/{set_name}/{mode}/weights"] = sel["weights"]
        records.append({**common, "lds": sel["lds"], "ci_low": sel["ci_low"],
                        "ci_high": sel["ci_high"], "lambda": sel["lam"],
                        "lambda_rel": sel["lam"] / solver.trace_scale,
                        "lambda_selection": mode,
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


def stage_lds(run) -> dict:
    from .methods import get_method
    from .pipeline import _target_sets, context

    t0 = time.time()
    masks = subset_masks(run)
    jobs = lds_jobs(run, masks)
    save_jobs(jobs, run.paths.lds / "jobs.json")
    LocalExecutor(run.cfg.lds.workers, threads_per_worker=run.cfg.torch_threads,
                  progress=run.progress).run(jobs, desc="LDS models")
    ctx = context(run)
    records, curves, ceilings, predictions = [], [], [], {}
    for set_name in _target_sets(run, ctx):
        truth = ground_truth(run, jobs, set_name, ctx.examples(set_name))
        if truth.shape[0] >= 2:
            ceil = lds_math.seed_ceiling(truth, n_boot=run.cfg.lds.n_boot)
            ceilings.append({"targets": set_name, **ceil.to_dict(), "n_seeds": truth.shape[0]})
        for name in run.cfg.attribution.methods:
            if not get_method(name).applies_to(set_name):
                continue
            recs, crv = _evaluate(run, ctx, name, set_name, masks, truth, predictions)
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


def compare(run, method_a: str, method_b: str, set_name: str, selection: str = "heldout"
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
    preds = np.load(path)

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
    truth = np.load(run.paths.truth(set_name))
    res = lds_math.difference(preds[ka], preds[kb], truth, weights, n_boot=run.cfg.lds.n_boot)
    return {"a": method_a, "b": method_b, "targets": set_name, "selection": selection, **res}
