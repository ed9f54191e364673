"""Counterfactual evaluation: remove a target's top proponents, retrain, regenerate, compare.

For each generated target x (a seeded choice among the run's scored generated images) and
each method m, the k training images that m scores highest for x are removed (``random``:
k indices drawn at random, seeded per target), a model is retrained from scratch on the rest
with the full model's recipe and the seed ``counterfactual.seed``, and x is generated again
with its own seed and the run's sampler. The change is measured by

- ``pixel_l2``: ||x - x'||_2 of the flattened [-1, 1] images (higher = larger change);
- ``clip_cos``: cosine similarity of CLIP embeddings, when ``attribution.clip_path`` names a
  local CLIP model (lower = larger change); None otherwise.

A better attribution removes the images that made x, so its counterfactual changes more.

Steps, each resumable (``RUN/counterfactual``):

1. targets and removal sets: ``targets.json`` and ``removed/<method>.npy`` ``[T, k]``
   (training indices, highest score first);
2. one model per (method, target) through the retraining farm: job table ``jobs.json``,
   models ``models/<method>-t<XXXX>/`` (finished jobs are never redone, killed ones resume);
3. the regenerated target ``models/<job>/sample.npy`` ``[C, H, W]`` (kept beside the model it
   came from) and ``images/<method>/<XXXX>.png``;
4. ``RUN/results/counterfactual.json`` (records per target and method, mean and median per
   method and metric, every pair of methods' difference of medians with a paired bootstrap
   interval over targets, settings), ``<metric>.png`` distribution plots and
   ``panels/target-<XXXX>.png`` (the original, then each method's counterfactual).

Scores are the rows of ``RUN/scores/<method>/gen.npy`` (the score stage's); a method whose
matrix is missing is scored here with the prior lambda of :func:`dtrak.methods.default_lambda`
and saved there. The ``random`` baseline never reads a score matrix, even if one exists.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import figures
from ..artefacts import load_npy, save_npy
from ..clip import clip_cosine
from ..config import Config, to_dict
from ..families import ModelFamily
from ..farm import TrainJob, load_jobs, same_job, save_jobs, train_jobs
from ..images import save_png
from ..lds import median_difference
from ..methods import default_lambda, get_method
from ..seeding import seed_from
from .basic import train_images_file
from .check import removal_count
from .run import Run
from .score import saved_scores, score_method, write_scores

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "RANDOM",
    "choose_targets",
    "counterfactual_jobs",
    "counterfactual_records",
    "job_name",
    "pixel_l2",
    "random_removal",
    "regenerate",
    "removal_count",
    "removal_sets",
    "stage_counterfactual",
    "summarize",
    "top_k_removal",
]

RANDOM = "random"  # the baseline: k random training indices per target
METRICS = ("pixel_l2", "clip_cos")


# ----------------------------------------------------------------------------- removal sets


def choose_targets(n_pool: int, n_targets: int, seed: int) -> np.ndarray:
    """``[n_targets]`` distinct generated-image ids in ``0..n_pool-1``, seeded, in draw order.

    The first ``n_targets`` of one seeded permutation: raising ``n_targets`` later keeps the
    targets (and the finished retrainings) of the smaller run, and a run stopped part-way has
    finished the jobs of a smaller ``n_targets`` (jobs follow this order)."""
    if not 1 <= n_targets <= n_pool:
        raise ValueError(f"counterfactual.n_targets = {n_targets}, but only {n_pool} scored "
                         "generated images exist; lower it, or generate and score more images "
                         "(sampling.n_images, attribution.n_targets)")
    rng = np.random.default_rng(seed_from(seed, "counterfactual-targets"))
    return rng.permutation(n_pool)[:n_targets]


def top_k_removal(scores: np.ndarray, targets: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """``[len(targets), k]`` training indices with the k highest scores of each target's row.

    ``scores`` is ``[T_all, N]`` (positive = helps the target); rows are picked by ``targets``.
    Highest score first; ties go to the lower index.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [targets, train], got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"cannot remove k = {k} of {scores.shape[1]} training images")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[0]):
        raise ValueError(f"target ids {targets.tolist()} out of range for {scores.shape[0]} "
                         "score rows")
    return np.argsort(-scores[targets], axis=1, kind="stable")[:, :k]


def random_removal(n_train: int, targets: Sequence[int] | np.ndarray, k: int, seed: int
                   ) -> np.ndarray:
    """``[len(targets), k]`` distinct random training indices per target.

    Each target's draw is seeded by (seed, target) alone, whatever the other targets.
    """
    if not 1 <= k <= n_train:
        raise ValueError(f"cannot remove k = {k} of {n_train} training images")
    return np.stack([
        np.random.default_rng(seed_from(seed, "counterfactual-random", int(t)))
        .choice(n_train, k, replace=False) for t in targets
    ]).reshape(len(targets), k)


def removal_sets(method: str, scores: np.ndarray | None, targets: Sequence[int] | np.ndarray,
                 k: int, n_train: int, seed: int) -> np.ndarray:
    """``[len(targets), k]`` indices removed for each target: random, or the method's top k."""
    if method == RANDOM:
        return random_removal(n_train, targets, k, seed)
    if scores is None:
        raise ValueError(f"method {method!r} needs a score matrix [targets, train]")
    if scores.shape[1] != n_train:
        raise ValueError(f"scores of {method!r} have {scores.shape[1]} columns but the training "
                         f"set has {n_train} images; recompute them (`dtrak score`)")
    return top_k_removal(scores, targets, k)


# ----------------------------------------------------------------------------- metrics


def pixel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n]`` L2 norms of the differences of flattened images ``[n, C, H, W]`` (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images to compare have shapes {a.shape} and {b.shape}")
    return np.linalg.norm((a - b).reshape(a.shape[0], -1), axis=1)


def _clip_cos(a: np.ndarray, b: np.ndarray, clip_path: str) -> np.ndarray:
    out = clip_cosine(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)),
                      torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)), clip_path)
    return np.asarray(torch.as_tensor(out).detach().cpu(), dtype=np.float64).reshape(-1)


def counterfactual_records(
    originals: np.ndarray,
    regenerated: Mapping[str, np.ndarray],
    targets: Sequence[int] | np.ndarray,
    clip_path: str | None = None,
) -> list[dict]:
    """One record per (target, method): ``target``, ``method``, ``pixel_l2``, ``clip_cos``.

    Args:
        originals: ``[T, C, H, W]`` the generated targets, in [-1, 1].
        regenerated: method -> ``[T, C, H, W]`` the targets regenerated by its models.
        targets: ``[T]`` the targets' generated-image ids.
        clip_path: a local CLIP model; None leaves ``clip_cos`` None.
    """
    records = []
    for method, images in regenerated.items():
        l2 = pixel_l2(originals, images)
        cos = _clip_cos(originals, images, clip_path) if clip_path else [None] * len(l2)
        records += [{"target": int(t), "method": method, "pixel_l2": float(d),
                     "clip_cos": None if c is None else float(c)}
                    for t, d, c in zip(targets, l2, cos, strict=True)]
    return records


def summarize(records: Sequence[Mapping]) -> list[dict]:
    """Mean and median per (method, metric) over the targets with a value."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        for metric in METRICS:
            v = [r[metric] for r in records if r["method"] == method and r.get(metric) is not None]
            if v:
                rows.append({"method": method, "metric": metric, "mean": float(np.mean(v)),
                             "median": float(np.median(v)), "n": len(v)})
    return rows


def paired_differences(records: Sequence[Mapping], n_boot: int, seed: int) -> list[dict]:
    """Every later method's median minus every earlier one's (in the records' order), per
    metric, over the targets both have a value for: paired bootstrap over targets
    (:func:`~dtrak.lds.median_difference`)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for metric in METRICS:
        value = {(r["method"], r["target"]): r[metric] for r in records
                 if r.get(metric) is not None}
        for i, first in enumerate(methods):
            for later in methods[i + 1:]:
                both = sorted({t for m, t in value if m == first}
                              & {t for m, t in value if m == later})
                if both:
                    d = median_difference([value[later, t] for t in both],
                                          [value[first, t] for t in both], n_boot, seed)
                    rows.append({"a": later, "b": first, "metric": metric, **d})
    return rows


def _table(summary: Sequence[Mapping], differences: Sequence[Mapping] = ()) -> str:
    lines = [f"{'method':<16}{'metric':<10}{'mean':>10}{'median':>10}{'n':>5}"]
    lines += [f"{s['method']:<16}{s['metric']:<10}{s['mean']:>10.4g}{s['median']:>10.4g}"
              f"{s['n']:>5}" for s in summary]
    if differences:
        lines.append("difference of medians, paired bootstrap over targets (95%):")
        lines += [f"  {d['a'] + ' - ' + d['b']:<24}{d['metric']:<10}{d['diff']:>+9.4g} "
                  f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]  n = {d['n']}"
                  for d in differences]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- retraining


def job_name(method: str, target: int) -> str:
    return f"{method}-t{int(target):04d}"


def counterfactual_jobs(run: Run, targets: Sequence[int] | np.ndarray,
                        removed: Mapping[str, np.ndarray]) -> list[TrainJob]:
    """One job per (method, target): the full model's recipe on the kept indices.

    ``removed[method]`` is ``[T, k]`` (row i belongs to ``targets[i]``). Every model is
    trained with ``counterfactual.seed`` (batch order, dropout, initialisation and noise).
    Target-major, in the targets' (draw) order: a run stopped part-way has every method of
    its first targets.
    """
    cfg = run.cfg
    images = str(train_images_file(run))
    n_train = int(run.dataset.train.images.shape[0])
    jobs = []
    for i, t in enumerate(targets):
        for method, rows in removed.items():
            row = rows[i]
            name = job_name(method, t)
            keep = np.setdiff1d(np.arange(n_train), row)
            jobs.append(TrainJob(
                name=name, directory=str(run.paths.counterfactual / "models" / name),
                images=images, indices=tuple(int(i) for i in keep), model=to_dict(cfg.model),
                train=to_dict(cfg.train), seed=cfg.counterfactual.seed))
    return jobs


def _save_job_table(jobs: Sequence[TrainJob], path: Path, root: Path) -> None:
    """Write the table; listed jobs must be unchanged, new ones (methods, targets) are added."""
    if not path.exists():
        save_jobs(jobs, path, root=root)
        return
    old = {j.name: j for j in load_jobs(path, root=root)}
    changed = [j.name for j in jobs if j.name in old and not same_job(old[j.name], j)]
    if changed:
        raise ValueError(
            f"{path} lists other training indices or another recipe for {', '.join(changed[:4])}"
            f"{' ...' if len(changed) > 4 else ''} (scores or training data changed since); "
            f"remove {path.parent} to recompute the counterfactuals")
    new = [j for j in jobs if j.name not in old]
    if new:
        tmp = path.with_suffix(".tmp.json")
        tmp.unlink(missing_ok=True)
        save_jobs([*old.values(), *new], tmp, root=root)
        tmp.replace(path)


# ----------------------------------------------------------------------------- regeneration


def regenerate(family: ModelFamily, model, cfg: Config, target: int) -> np.ndarray:
    """Generated image ``target`` ``[C, H, W]`` in [-1, 1]: its own seed, the run's sampler.

    From the model that made ``RUN/gen`` this is the generated image again: bit for bit when
    generation also ran one image per batch, else up to float rounding (~1e-6 pixel L2).
    """
    return family.sample(model, cfg.model, cfg.sampling, [int(target)],
                         keep_trajectory=False).images[0].numpy()


def _regenerated(run: Run, job: TrainJob, target: int) -> np.ndarray:
    """The target regenerated by the job's model (cached as ``sample.npy`` beside it)."""
    path = Path(job.directory) / "sample.npy"
    if path.exists():
        return load_npy(path)
    model = run.load_model(Path(job.directory) / "unet")
    image = regenerate(run.family, model, run.cfg, target)
    save_npy(path, image)
    return image


# ----------------------------------------------------------------------------- the stage


def method_scores(run: Run, name: str) -> np.ndarray | None:
    """``[T, N]`` gen scores of a method (scored and saved if missing); None for random."""
    if name == RANDOM:
        return None
    path = run.paths.scores(name, "gen")
    method = get_method(name)
    saved = saved_scores(run, method, "gen")
    if saved is not None:
        return saved
    lam = default_lambda(run.context, method)
    log.info("no %s; scoring the generated images with %s (prior lambda %s)", path, name, lam)
    scores = score_method(run, method, "gen", lam)
    meta = {"method": name, "targets": "gen", "lambda": lam,
            "lambda_selection": "prior" if method.uses_lambda else None,
            "shape": list(scores.shape), "outputs": list(method.outputs), "sign": method.sign,
            "written_by": "counterfactual"}
    write_scores(run, name, "gen", scores, meta)
    return np.asarray(scores, dtype=np.float32)


def _generated(run: Run) -> np.ndarray:
    path = run.paths.gen / "images.npy"
    done = run.paths.gen / "done.npy"
    if not path.exists() or (done.exists() and not load_npy(done).all()):
        raise FileNotFoundError(f"no finished generated images in {run.paths.gen}; run "
                                f"`dtrak generate --out {run.paths.root}` first")
    return load_npy(path)


def _target_pool(run: Run, n_gen: int, scores: Mapping[str, np.ndarray | None]) -> int:
    """How many generated images (ids 0..pool-1) every method has scores for."""
    pool = min(n_gen, run.cfg.attribution.n_targets or n_gen)
    for name, s in scores.items():
        if s is not None and s.shape[0] < pool:
            raise ValueError(
                f"{run.paths.scores(name, 'gen')} scores {s.shape[0]} generated images, fewer "
                f"than the {pool} the run has; recompute it (`dtrak score --method {name}`)")
    return pool


def _score_source(run: Run, name: str) -> dict:
    if name == RANDOM:
        return {"kind": "seeded random choice per target"}
    meta = run.paths.scores(name, "gen").with_suffix(".json")
    info = json.loads(meta.read_text()) if meta.exists() else {}
    return {"kind": "top-k of the score row", "lambda": info.get("lambda"),
            "lambda_selection": info.get("lambda_selection")}


def _save_removed(root: Path, targets: np.ndarray, removed: Mapping[str, np.ndarray]) -> None:
    (root / "removed").mkdir(parents=True, exist_ok=True)
    (root / "targets.json").write_text(json.dumps({"targets": targets.tolist()}) + "\n")
    for method, rows in removed.items():
        save_npy(root / "removed" / f"{method}.npy", rows.astype(np.int64))


def _write_figures(root: Path, originals: np.ndarray, regenerated: Mapping[str, np.ndarray],
                   targets: np.ndarray, records: list[dict], k: int) -> list[Path]:
    """Per-method PNGs, one distribution plot per metric, one panel per target."""
    for method, images in regenerated.items():
        for t, image in zip(targets, images, strict=True):
            save_png(image, root / "images" / method / f"{int(t):04d}.png")
    plots = [figures.counterfactual_distribution(records, root / f"{m}.png", m)
             for m in METRICS if any(r.get(m) is not None for r in records)]
    by_key = {(r["target"], r["method"]): r for r in records}
    for i, t in enumerate(targets):
        captions = [f"original #{int(t)}"] + [
            f"{figures.display_name(m)}: L2 {by_key[(int(t), m)]['pixel_l2']:.3g}"
            for m in regenerated]
        figures.image_strip([originals[i], *(v[i] for v in regenerated.values())], captions,
                            root / "panels" / f"target-{int(t):04d}.png",
                            title=f"target #{int(t)}, regenerated without its top {k}")
    return plots


def stage_counterfactual(run: Run) -> dict:
    """The counterfactual evaluation of a run (see the module docstring); resumable."""
    t0 = time.time()
    cf, root = run.cfg.counterfactual, run.paths.counterfactual
    gen = _generated(run)
    n_train = int(run.dataset.train.images.shape[0])
    k = removal_count(cf.remove, n_train)

    # 1. targets and what each method removes for them
    scores = {m: method_scores(run, m) for m in cf.methods}
    targets = choose_targets(_target_pool(run, gen.shape[0], scores), cf.n_targets, cf.seed)
    removed = {m: removal_sets(m, scores[m], targets, k, n_train, cf.seed) for m in cf.methods}
    _save_removed(root, targets, removed)

    # 2. one retrained model per (method, target), through the farm
    jobs = counterfactual_jobs(run, targets, removed)
    _save_job_table(jobs, root / "jobs.json", run.paths.root)
    run.executor().run(train_jobs(jobs, run.cfg.runtime), desc="counterfactual models")

    # 3. regenerate every target with its models; 4. compare with the originals
    by_name = {j.name: j for j in jobs}
    regenerated = {m: np.stack([_regenerated(run, by_name[job_name(m, t)], t)
                                for t in targets]) for m in cf.methods}
    originals = gen[targets]
    records = counterfactual_records(originals, regenerated, targets,
                                     run.cfg.attribution.clip_path)
    summary = summarize(records)
    differences = paired_differences(records, run.cfg.lds.n_boot, cf.seed)
    plots = _write_figures(root, originals, regenerated, targets, records, k)

    settings = {"n_targets": cf.n_targets, "remove": cf.remove, "k": k, "n_train": n_train,
                "seed": cf.seed, "methods": list(cf.methods), "targets": targets.tolist(),
                "sampler": run.cfg.sampling.sampler, "sampling_steps": run.cfg.sampling.steps,
                "gen_seed": run.cfg.sampling.gen_seed,
                "clip_path": run.cfg.attribution.clip_path,
                "scores": {m: _score_source(run, m) for m in cf.methods},
                "seconds": time.time() - t0}
    run.paths.results.mkdir(parents=True, exist_ok=True)
    out = run.paths.results / "counterfactual.json"
    out.write_text(json.dumps({"records": records, "summary": summary,
                               "differences": differences, "settings": settings},
                              indent=2, default=float) + "\n")
    table = _table(summary, differences)
    log.info("counterfactual (k = %d of %d removed)\n%s", k, n_train, table)
    return {"results": str(out), "k": k, "targets": targets.tolist(),
            "table": table.splitlines(), "plots": [str(p) for p in plots]}
