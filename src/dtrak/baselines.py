"""The paper's baselines (SPEC section 4) as registered attribution methods.

Each method scores a target set into a ``[targets, N_train]`` float32 matrix, positive = the
training example helps the target (lowers its loss); the ``sign`` of each registry entry says
why. The numerical cores are :mod:`dtrak.scoring`'s; this module gathers what they read
(images, CLIP embeddings, loss-gradient features of the full model, of its checkpoints or along
a sampling trajectory, losses of retrained models) through a :class:`~dtrak.methods.Context`.

=====================  ==============================================================  ======
method                 score                                                           lambda
=====================  ==============================================================  ======
random                 iid N(0, 1), seeded by the target set's name (control)          no
pixel-dot, pixel-cos   dot / cosine of flattened images in [-1, 1]                     no
clip-dot, clip-cos     dot / cosine of CLIP image embeddings (attribution.clip_path)   no
grad-dot, grad-cos     dot / cosine of the full model's loss-gradient features         no
tracin-dot, -cos       grad-dot / grad-cos averaged over training checkpoints          no
relative-if            TRAK (loss) / ||(Phi^T Phi + lam I)^-1 phi(z)||                 yes
renorm-if              TRAK (loss) / ||phi(z)||                                        yes
journey-trak           TRAK (loss) kernel, target features along the DDIM trajectory   yes
empirical-influence    mean loss of pool models without z - with z                     no
datamodel              minus the ridge coefficient of z (outputs ~ inclusion mask)     no
trak-ensemble          mean TRAK (loss) scores of 8 pool models, each its own kernel   yes
dtrak-ensemble         the same with L_Square (D-TRAK) features                        yes
=====================  ==============================================================  ======

Choices where the SPEC leaves room (documented, not silent):

- TracIn: the plain average over checkpoints (SPEC: 4 evenly spaced), not weighted by the
  learning rate as in the TracIn paper. Checkpoints: ``attribution.checkpoints`` (training
  steps), else 4 evenly spaced among the saved ones (``np.linspace`` over the sorted list, so
  the first and the last saved are included). Each checkpoint gets its own projection
  (``model_id = "ckpt-<step>"``), as TRAK does per model.
- Journey TRAK: K = ``attribution.n_timesteps`` sampling steps evenly spaced among the S
  steps of the saved trajectory (``np.linspace(0, S - 1, K).round()``, all S if K > S); at
  step i the predicted clean image x0_hat is re-noised to the sampler's timestep t_i (from
  ``RUN/gen/meta.json``, else recomputed from the sampling config) with the usual
  per-(example, timestep) noise; the scores use the ordinary training-feature kernel.
  Generated targets only.
- Empirical influence and datamodels: a pool of models retrained on random half subsets
  drawn apart from the LDS subsets (subset m with ``random_state = 10_000 + 2m``; the LDS
  uses ``lds.seed_base + 2m``, 42 by default), ``lds.n_subsets`` of them (there is no pool
  size of its own in the config), each trained with every seed of ``lds.seeds`` by the LDS
  recipe (:func:`dtrak.evaluation.lds_jobs`, including ``train.common_init``). A pool model's
  output on a target is L_Simple computed exactly as the LDS ground truth; outputs are
  averaged over seeds. The datamodel's ridge alpha is chosen by leave-one-out error
  (``sklearn.linear_model.RidgeCV``) over :data:`DATAMODEL_ALPHAS`; with fewer than 4 pool
  subsets it is ``M / 4`` (the diagonal of the centred mask Gram).
- Ensembles (``trak-ensemble``, ``dtrak-ensemble``): the first 8 models of that pool (first
  seed only); each has its own projection and kernel, and gets the same lambda relative to
  its own kernel scale; the scores are averaged (TRAK's ensembling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import scoring
from .gradients import UNet2DAdapter, output_values
from .methods import Context, Method, register
from .model import build_scheduler, load_unet
from .noise import ScheduleConstants, timesteps
from .seeding import seed_from

log = logging.getLogger(__name__)

__all__ = [
    "DATAMODEL_ALPHAS",
    "POOL_SEED_BASE",
    "datamodel_alpha",
    "journey_features",
    "journey_steps",
    "model_losses",
    "pool_outputs",
    "sampler_timesteps",
    "tracin_checkpoints",
]

#: Pool subset m is drawn with ``random_state = POOL_SEED_BASE + 2m`` (apart from the LDS's).
POOL_SEED_BASE = 10_000
#: Ridge alphas the datamodel chooses from by leave-one-out error: 10^-2 .. 10^4.
DATAMODEL_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))

_HELPS_IF_SIMILAR = (
    "similar = helps: a training image that looks like the target (larger dot product / "
    "cosine) is assumed to help it"
)
_GRADIENT_SIGN = (
    "positive = helps: a gradient step on z moves theta by -eta g(z) and changes the loss on "
    "x by -eta g(x).g(z), so a positive product of loss gradients lowers the loss on x"
)
_TRAK_SIGN = "as trak (positive: up-weighting z lowers the target's loss), divided by a "


def _as_rows(images: torch.Tensor) -> np.ndarray:
    """Images ``[n, ...]`` -> ``[n, prod(...)]`` float32 numpy."""
    return images.reshape(images.shape[0], -1).float().numpy()


# ----------------------------------------------------------------------------- random


def _random(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    n_targets = ctx.examples(set_name).shape[0]
    seed = seed_from("random-scores", set_name)
    return scoring.random_scores(n_targets, ctx.train.shape[0], seed)


register(Method("random", "iid N(0, 1) scores seeded by the target set's name (control)",
                "no meaning: a control whose LDS should be about 0", _random))


# ----------------------------------------------------------------------------- pixels, CLIP


def _similarity(targets: np.ndarray, train: np.ndarray, cosine: bool) -> np.ndarray:
    return (scoring.cosine_scores if cosine else scoring.dot_scores)(targets, train)


def _pixel(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        return _similarity(_as_rows(ctx.examples(set_name)), _as_rows(ctx.train), cosine)

    return score


def _clip_path(ctx: Context, name: str) -> str:
    path = ctx.cfg.attribution.clip_path
    if not path:
        raise ValueError(
            f"method {name} needs `--set attribution.clip_path=DIR`, a local CLIP model "
            "directory (such as openai/clip-vit-base-patch32 saved with save_pretrained); "
            "dtrak never downloads models"
        )
    return path


def _clip(name: str, cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        from .clip import clip_embed

        path = _clip_path(ctx, name)
        return _similarity(clip_embed(ctx.examples(set_name), path),
                           clip_embed(ctx.train, path), cosine)

    return score


for _cos in (False, True):
    _kind = "cosine" if _cos else "dot product"
    _sfx = "cos" if _cos else "dot"
    register(Method(f"pixel-{_sfx}", f"{_kind} of raw pixels (flattened, in [-1, 1])",
                    _HELPS_IF_SIMILAR, _pixel(_cos)))
    register(Method(f"clip-{_sfx}", f"{_kind} of CLIP image embeddings "
                    "(model from attribution.clip_path)", _HELPS_IF_SIMILAR,
                    _clip(f"clip-{_sfx}", _cos)))


# ----------------------------------------------------------------------------- gradients


def _grad(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        return _similarity(ctx.features(set_name, "loss"), ctx.features("train", "loss"),
                           cosine)

    return score


_STEP_DIR = re.compile(r"step-(\d+)$")


def tracin_checkpoints(model_dir: str | Path, steps: tuple[int, ...] | None = None,
                       n: int = 4) -> list[tuple[int, Path]]:
    """The checkpoints TracIn averages: ``[(step, directory with unet/)]``, ascending.

    ``model_dir`` is the full model's ``RUN/model/unet``; checkpoints are in
    ``RUN/model/checkpoints/step-XXXXXXX``. ``steps`` names them; None takes ``n`` evenly
    spaced among those saved (``np.linspace`` over the sorted list: first and last included).
    """
    root = Path(model_dir).parent / "checkpoints"
    saved = {}
    for d in root.glob("step-*"):
        m = _STEP_DIR.match(d.name)
        if m and (d / "unet" / "config.json").is_file():
            saved[int(m.group(1))] = d
    have = sorted(saved)
    if steps is not None:
        missing = [s for s in steps if s not in saved]
        if missing:
            raise FileNotFoundError(
                f"TracIn: no saved checkpoint for step(s) {missing} in {root} (saved: "
                f"{have or 'none'}); set attribution.checkpoints to saved steps"
            )
        return [(s, saved[s]) for s in sorted(set(steps))]
    if not have:
        raise FileNotFoundError(
            f"TracIn needs saved training checkpoints in {root}, found none; train with "
            "train.checkpoint_every below the number of steps"
        )
    idx = np.unique(np.linspace(0, len(have) - 1, min(n, len(have))).round().astype(int))
    return [(have[i], saved[have[i]]) for i in idx]


def _tracin(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        pairs = []
        for step, directory in tracin_checkpoints(ctx.model_dir, ctx.cfg.attribution.checkpoints):
            adapter = UNet2DAdapter(load_unet(directory / "unet"))
            mid = f"ckpt-{step}"
            pairs.append((ctx.features(set_name, "loss", adapter=adapter, model_id=mid),
                          ctx.features("train", "loss", adapter=adapter, model_id=mid)))
        return scoring.tracin_scores(pairs, cosine=cosine)

    return score


for _cos in (False, True):
    _kind = "cosine" if _cos else "dot product"
    _sfx = "cos" if _cos else "dot"
    register(Method(f"grad-{_sfx}", f"{_kind} of loss-gradient features (no kernel)",
                    _GRADIENT_SIGN, _grad(_cos), outputs=("loss",)))
    register(Method(f"tracin-{_sfx}", f"TracIn: {_kind} of loss-gradient features averaged "
                    "over training checkpoints (plain mean, no learning-rate weights)",
                    _GRADIENT_SIGN + ", averaged over checkpoints", _tracin(_cos)))
del _cos, _kind, _sfx


# ----------------------------------------------------------------------------- kernel variants


def _relative(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return scoring.relative_influence(ctx.solver("loss"), ctx.features(set_name, "loss"), lam)


def _renorm(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return scoring.renormalized_influence(ctx.solver("loss"), ctx.features(set_name, "loss"),
                                          lam, train_features=ctx.features("train", "loss"))


register(Method("relative-if", "relative influence: TRAK (loss) score / "
                "||(Phi^T Phi + lam I)^-1 phi(z)||",
                _TRAK_SIGN + "positive per-example norm", _relative, uses_lambda=True,
                outputs=("loss",), output="loss"))
register(Method("renorm-if", "renormalized influence: TRAK (loss) score / ||phi(z)||",
                _TRAK_SIGN + "positive per-example norm", _renorm, uses_lambda=True,
                outputs=("loss",), output="loss"))


# ----------------------------------------------------------------------------- Journey TRAK


def sampler_timesteps(ctx: Context) -> list[int]:
    """The sampler's timesteps ``[S]`` in sampling order (descending).

    From ``RUN/gen/meta.json`` when the context has a run directory, else recomputed from
    the sampling config exactly as :func:`dtrak.sampling.sample_images` sets them.
    """
    if ctx.run_dir is not None:
        meta = Path(ctx.run_dir) / "gen" / "meta.json"
        if meta.is_file():
            saved = json.loads(meta.read_text()).get("timesteps")
            if saved:
                return [int(t) for t in saved]
    sc = ctx.cfg.sampling
    sched = build_scheduler(ctx.cfg.model, sc.sampler)
    sched.set_timesteps(sc.steps)
    return [int(t) for t in sched.timesteps]


def journey_steps(n_steps: int, k: int) -> np.ndarray:
    """Indices of ``k`` sampling steps evenly spaced among ``n_steps`` (all if k >= n_steps)."""
    if n_steps < 1 or k < 1:
        raise ValueError(f"journey_steps needs n_steps, k >= 1, got {n_steps}, {k}")
    return np.unique(np.linspace(0, n_steps - 1, min(k, n_steps)).round().astype(int))


def journey_features(ctx: Context, set_name: str = "gen") -> np.ndarray:
    """Loss-gradient features ``[T, k]`` of generated targets along their trajectories."""
    if set_name != "gen":
        raise ValueError("journey-trak needs generated targets (the gen set), "
                         f"not {set_name!r}")
    traj = ctx.trajectories.get("gen")
    if traj is None:
        raise FileNotFoundError(
            "journey-trak needs the sampling trajectories (RUN/gen/trajectory.npy): generate "
            "with sampling.save_trajectory=true"
        )
    n_targets = ctx.examples("gen").shape[0]
    if traj.dim() != 5 or traj.shape[0] != n_targets:
        raise ValueError(f"trajectories must be [{n_targets}, S, C, H, W] (one per gen target), "
                         f"got {tuple(traj.shape)}")
    n_steps = traj.shape[1]
    ts_all = sampler_timesteps(ctx)
    if len(ts_all) != n_steps:
        raise ValueError(
            f"the trajectory has {n_steps} steps but the sampler has {len(ts_all)} timesteps; "
            "regenerate (dtrak generate) with the run's sampling config"
        )
    steps = journey_steps(n_steps, ctx.cfg.attribution.n_timesteps)
    x0 = traj[:, torch.as_tensor(steps)]  # [T, K, C, H, W]
    ts = torch.tensor([ts_all[i] for i in steps], dtype=torch.long)
    spec = ctx.spec("loss", journey=True, n_timesteps=len(steps))
    return ctx.features("gen", "loss", spec=spec, examples=x0, timestep_values=ts)


def _journey(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return ctx.solver("loss").scores(journey_features(ctx, set_name), lam)


register(Method("journey-trak", "Journey TRAK: the TRAK (loss) kernel with target features "
                "averaged along the sampling trajectory (re-noised x0_hat at each step); "
                "generated targets only",
                "as trak: positive = up-weighting z lowers the loss along the target's "
                "trajectory", _journey, uses_lambda=True, outputs=("loss",), output="loss",
                sets=("gen",)))


# ----------------------------------------------------------------------------- model pool


def model_losses(adapter, targets: torch.Tensor, sched: ScheduleConstants,
                 ts: torch.Tensor, noise_seeds) -> np.ndarray:
    """L_Simple ``[T]`` of one model on targets ``[T, C, H, W]``: mean over ``ts`` and seeds.

    The computation of the LDS ground truth (:func:`dtrak.evaluation.ground_truth`): noise
    seed ``1_000_003 * (s + 1)`` for each noise seed s, targets numbered 0..T-1.
    """
    ids = torch.arange(targets.shape[0])
    vals = [output_values(adapter, targets, ids, "loss", ts, sched,
                          noise_seed=1_000_003 * (ns + 1), batch_size=512).mean(dim=1)
            for ns in noise_seeds]
    return torch.stack(vals).mean(0).double().numpy()


def _pool_run(ctx: Context, name: str):
    from .paths import RunPaths
    from .pipeline import Run

    if ctx.run_dir is None:
        raise ValueError(
            f"method {name} retrains models, so it needs a run directory (Context.run_dir); "
            "score it through a run (`dtrak score --out RUN`)"
        )
    return Run(RunPaths(Path(ctx.run_dir)), ctx.cfg, ctx.progress)


def _pool_masks(run, n_train: int) -> np.ndarray:
    from . import lds as lds_math
    from .data import load_split_indices

    c = run.cfg.lds
    labels = (load_split_indices(run.paths.splits)["train_labels"] if run.paths.splits.exists()
              else run.dataset.train.labels)
    if len(labels) != n_train:
        raise ValueError(f"{run.paths.splits} lists {len(labels)} training labels but the "
                         f"context has {n_train} training images; use --overwrite")
    masks = lds_math.subset_masks(labels, c.n_subsets, c.alpha, seed_base=POOL_SEED_BASE)
    path = run.paths.pool / "masks.npy"
    if path.exists():
        if not np.array_equal(np.load(path), masks):
            raise ValueError(f"{path} differs from the pool masks of this config; "
                             "use --overwrite or remove RUN/pool")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, masks)
    return masks


def _pool_jobs(run, masks: np.ndarray) -> list:
    """The LDS recipe on the pool subsets, written under RUN/pool/models (subset-major)."""
    from .evaluation import lds_jobs

    seeds = run.cfg.lds.seeds
    jobs = lds_jobs(run, masks)  # ordered m-major, then seeds
    return [replace(j, name=f"pool-m{i // len(seeds):03d}-s{seeds[i % len(seeds)]}",
                    directory=str(run.paths.pool_model(i // len(seeds), seeds[i % len(seeds)])))
            for i, j in enumerate(jobs)]


def _pool_truth(run, jobs: list, set_name: str, targets: torch.Tensor,
                sched: ScheduleConstants) -> np.ndarray:
    """``[S, M, T]`` losses of the pool models on the targets (resumable per model)."""
    c = run.cfg.lds
    S, M = len(c.seeds), len(jobs) // len(c.seeds)
    path = run.paths.pool_truth(set_name)
    done_path = path.with_name(f"{set_name}.done.npy")
    meta_path = path.with_name(f"{set_name}.json")
    T = run.cfg.model.num_train_timesteps
    ts = timesteps("uniform", min(c.eval_timesteps, T), T)
    meta = {"shape": [S, M, int(targets.shape[0])], "timesteps": ts.tolist(),
            "noise_seeds": list(c.noise_seeds), "models": [j.name for j in jobs],
            "targets_sha1": hashlib.sha1(targets.float().numpy().tobytes()).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not (path.exists() and done_path.exists() and meta_path.exists()
                 and json.loads(meta_path.read_text()) == meta)
    if fresh:
        truth, done = np.zeros(meta["shape"]), np.zeros((S, M), dtype=bool)
        meta_path.write_text(json.dumps(meta))
    else:
        truth, done = np.load(path), np.load(done_path)
    todo = [(si, m) for si in range(S) for m in range(M) if not done[si, m]]
    for si, m in tqdm(todo, desc=f"pool outputs {set_name}", disable=not run.progress,
                      leave=False):
        adapter = UNet2DAdapter(load_unet(Path(jobs[m * S + si].directory) / "unet"))
        truth[si, m] = model_losses(adapter, targets, sched, ts, c.noise_seeds)
        done[si, m] = True
        np.save(path, truth)
        np.save(done_path, done)
    return truth


def pool_outputs(ctx: Context, set_name: str, name: str = "empirical-influence"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Train the pool (if needed) and return ``(masks [M, N] bool, outputs [M, T])``.

    ``outputs[m, t]`` is the loss of pool subset m's models on target t, averaged over seeds.
    """
    from .evaluation import train_images_file
    from .farm import LocalExecutor, save_jobs

    run = _pool_run(ctx, name)
    targets = ctx.examples(set_name)
    masks = _pool_masks(run, ctx.train.shape[0])
    jobs = _pool_jobs(run, masks)
    train_images_file(run)
    save_jobs(jobs, run.paths.pool / "jobs.json")
    LocalExecutor(run.cfg.lds.workers, threads_per_worker=run.cfg.torch_threads,
                  progress=ctx.progress).run(jobs, desc="pool models")
    truth = _pool_truth(run, jobs, set_name, targets, ctx.sched)
    return masks, truth.mean(axis=0)


def datamodel_alpha(masks: np.ndarray, outputs: np.ndarray) -> float:
    """The datamodel ridge alpha: leave-one-out best of :data:`DATAMODEL_ALPHAS`.

    One alpha for all targets (``RidgeCV``, mean LOO squared error); with fewer than 4
    models there is too little to validate on and ``M / 4`` is used.
    """
    n_models = masks.shape[0]
    if n_models < 4:
        return n_models / 4
    from sklearn.linear_model import RidgeCV

    fit = RidgeCV(alphas=DATAMODEL_ALPHAS, fit_intercept=True)
    fit.fit(masks.astype(np.float64), np.asarray(outputs, dtype=np.float64))
    return float(fit.alpha_)


def _empirical(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    masks, outputs = pool_outputs(ctx, set_name, "empirical-influence")
    return scoring.empirical_influence(masks, outputs)


def _datamodel(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    masks, outputs = pool_outputs(ctx, set_name, "datamodel")
    alpha = datamodel_alpha(masks, outputs)
    log.info("datamodel %s: ridge alpha %.3g (leave-one-out over %d pool subsets)",
             set_name, alpha, masks.shape[0])
    info = Path(ctx.run_dir) / "pool" / f"datamodel-{set_name}.json"
    info.write_text(json.dumps({"ridge_alpha": alpha, "alphas": list(DATAMODEL_ALPHAS),
                                "n_models": int(masks.shape[0])}, indent=2))
    return scoring.datamodel_scores(masks, outputs, alpha)


register(Method("empirical-influence", "empirical influence: mean loss of pool models trained "
                "without z minus with z (pool: lds.n_subsets half subsets apart from the LDS "
                "ones, lds.seeds each)",
                "outputs are losses: positive = models that include z have a lower loss on "
                "the target (helps)", _empirical))
register(Method("datamodel", "linear datamodel: ridge regression of pool models' losses on "
                "the inclusion mask (alpha by leave-one-out), minus the coefficient",
                "the coefficient of z is the loss change from including z; the score is minus "
                "it (positive = including z lowers the loss = helps)", _datamodel))


# ----------------------------------------------------------------------------- ensembles

#: Models in a TRAK ensemble (the paper compares one D-TRAK model with 8 TRAK models).
ENSEMBLE_SIZE = 8


def ensemble_models(ctx: Context, n_models: int, name: str) -> list[Path]:
    """The first ``n_models`` pool subsets' models (first seed), trained if missing.

    Ensemble members are the pool's half-subset models (TRAK trains its ensembles on random
    subsets too); they never include the LDS subset models, whose outputs are the ground
    truth. Only these ``n_models`` jobs are run, so an ensemble costs ``n_models`` models.
    """
    from .evaluation import train_images_file
    from .farm import LocalExecutor, save_jobs

    run = _pool_run(ctx, name)
    if run.cfg.lds.n_subsets < n_models:
        raise ValueError(f"{name} needs {n_models} pool models but lds.n_subsets = "
                         f"{run.cfg.lds.n_subsets} sets the pool size; raise it")
    masks = _pool_masks(run, ctx.train.shape[0])
    S = len(run.cfg.lds.seeds)
    pool = _pool_jobs(run, masks)
    jobs = pool[: n_models * S : S]  # subset m, the first seed
    train_images_file(run)
    save_jobs(pool, run.paths.pool / "jobs.json")
    LocalExecutor(run.cfg.lds.workers, threads_per_worker=run.cfg.torch_threads,
                  progress=ctx.progress).run(jobs, desc=f"{name} models")
    return [Path(j.directory) for j in jobs]


def _ensemble(name: str, output: str, n_models: int) -> Method:
    def score(ctx: Context, set_name: str, lam: float) -> np.ndarray:
        # lam is absolute on the full model's kernel scale: each member gets the same lambda
        # relative to its own scale trace(Phi_m^T Phi_m)/N
        rel = lam / ctx.solver(output).trace_scale
        total = None
        for i, directory in enumerate(ensemble_models(ctx, n_models, name)):
            adapter = UNet2DAdapter(load_unet(directory / "unet"))
            mid = f"pool-m{i:03d}"
            ctx.features("train", output, adapter=adapter, model_id=mid)  # cached for solver
            phi_t = ctx.features(set_name, output, adapter=adapter, model_id=mid)
            solver = ctx.solver(output, model_id=mid)
            s = solver.scores(phi_t, rel * solver.trace_scale).astype(np.float64)
            total = s if total is None else total + s
        return (total / n_models).astype(np.float32)

    return Method(name, f"mean of the {output} kernel scores of {n_models} models trained on "
                  "pool half subsets (a TRAK-style ensemble; each model its own projection)",
                  "as the kernel: positive = up-weighting z lowers the target's output",
                  score, uses_lambda=True, outputs=(output,), output=output)


register(_ensemble("trak-ensemble", "loss", ENSEMBLE_SIZE))
register(_ensemble("dtrak-ensemble", "square", ENSEMBLE_SIZE))
