"""Training pools: subsets of the training set, one model per (subset, seed), loss tables.

Two pools share this code: the LDS pool (``RUN/lds``: subset m drawn with
``random_state = lds.seed_base + 2m``; its losses are the LDS ground truth) and the
attribution pool (``RUN/pool``: ``random_state = 10_000 + 2m``, apart from the LDS subsets;
read by empirical influence, datamodels and ensembles). Each step resumes:

1. masks ``[M, N]`` (``masks.npy``), reproducible from their seeds;
2. one model per (subset, seed) with the full model's recipe through the run's executor
   (job table ``jobs.json``; with ``train.common_init`` every model starts from the full
   model's initialisation and draws the same timestep/noise stream);
3. loss tables ``truth/<targets>.npy`` ``[S, M, T]``: L_Simple of every model on every
   target, averaged over ``lds.eval_timesteps`` evenly spaced timesteps and the noise seeds,
   with the same noise for every model. A done mask per model lets it resume, and
   ``truth/<targets>.json`` records what the table was computed from (the targets' content
   hash, timesteps, noise seeds, models): a table made from other targets is recomputed,
   never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import lds as lds_math
from ..artefacts import digest, load_npy, save_npy
from ..config import to_dict
from ..families import DiffusionAdapter
from ..farm import TrainJob, save_jobs, train_jobs
from ..gradients import output_values
from ..methods import Method
from ..noise import ScheduleConstants, timesteps
from .basic import train_images_file
from .run import Run

log = logging.getLogger(__name__)

__all__ = ["POOL_SEED_BASE", "Pool", "attribution_pool", "ensure_pool", "lds_pool",
           "model_losses", "pool_jobs", "pool_losses", "pool_masks", "train_pool"]

#: Attribution-pool subset m is drawn with ``random_state = POOL_SEED_BASE + 2m``.
POOL_SEED_BASE = 10_000
#: Noise seed s of a loss table draws from ``LOSS_NOISE_SEED * (s + 1)``.
LOSS_NOISE_SEED = 1_000_003


@dataclass(frozen=True)
class Pool:
    """Where a pool lives and how its subsets are drawn."""

    name: str  # "lds" or "pool"
    root: Path  # RUN/lds or RUN/pool
    seed_base: int  # subset m: random_state = seed_base + 2m
    job_prefix: str  # job names: <prefix>m<MMM>-s<S>

    def model_dir(self, subset: int, seed: int) -> Path:
        return self.root / "models" / f"m{subset:03d}-s{seed}"

    def truth(self, set_name: str) -> Path:
        return self.root / "truth" / f"{set_name}.npy"


def lds_pool(run: Run) -> Pool:
    return Pool("lds", run.paths.lds, run.cfg.lds.seed_base, "")


def attribution_pool(run: Run) -> Pool:
    return Pool("pool", run.paths.pool, POOL_SEED_BASE, "pool-")


def pool_masks(run: Run, pool: Pool) -> np.ndarray:
    """``[M, N]`` bool subset masks of the pool (saved; a saved different one is refused)."""
    c = run.cfg.lds
    masks = lds_math.subset_masks(run.dataset.train.labels, c.n_subsets, c.alpha, pool.seed_base)
    path = pool.root / "masks.npy"
    if path.exists():
        if not np.array_equal(load_npy(path), masks):
            raise ValueError(f"{path} differs from the masks of this config; use --overwrite")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy(path, masks)
    return masks


def pool_jobs(run: Run, pool: Pool, masks: np.ndarray) -> list[TrainJob]:
    """One training job per (subset, seed), subset-major: the full model's recipe."""
    cfg = run.cfg
    images = str(train_images_file(run))
    common = cfg.train.common_init
    jobs = []
    for m in range(masks.shape[0]):
        idx = tuple(int(i) for i in np.flatnonzero(masks[m]))
        for s in cfg.lds.seeds:
            jobs.append(TrainJob(
                name=f"{pool.job_prefix}m{m:03d}-s{s}", directory=str(pool.model_dir(m, s)),
                images=images, indices=idx, model=to_dict(cfg.model), train=to_dict(cfg.train),
                seed=s, init_seed=cfg.train.seed + s if common else None,
                noise_seed=cfg.train.seed + s if common else None))
    return jobs


def train_pool(run: Run, pool: Pool, only: Sequence[TrainJob] | None = None,
               desc: str | None = None) -> list[TrainJob]:
    """Write the pool's job table and train its models (``only``: just these of them)."""
    masks = pool_masks(run, pool)
    jobs = pool_jobs(run, pool, masks)
    save_jobs(jobs, pool.root / "jobs.json", root=run.paths.root)
    todo = jobs if only is None else list(only)
    run.executor().run(train_jobs(todo, run.cfg.runtime), desc=desc or f"{pool.name} models")
    return jobs


def model_losses(adapter: DiffusionAdapter, targets, sched: ScheduleConstants,
                 ts: torch.Tensor, noise_seeds: Iterable[int]) -> np.ndarray:
    """L_Simple ``[T]`` of one model on targets: mean over ``ts`` and noise seeds.

    Noise seed ``LOSS_NOISE_SEED * (s + 1)`` for each noise seed s, targets numbered
    0..T-1, the same for every model (common random numbers across the pool).
    """
    x0, cond = adapter.prepare(targets)
    ids = torch.arange(x0.shape[0])
    vals = [output_values(adapter, x0, ids, "loss", ts, sched, cond=cond,
                          noise_seed=LOSS_NOISE_SEED * (ns + 1), batch_size=512).mean(dim=1)
            for ns in noise_seeds]
    return torch.stack(vals).mean(0).double().cpu().numpy()


def _table_meta(run: Run, jobs: Sequence[TrainJob], targets: torch.Tensor, ts: torch.Tensor
                ) -> dict:
    S = len(run.cfg.lds.seeds)
    return {"shape": [S, len(jobs) // S, int(targets.shape[0])], "timesteps": ts.tolist(),
            "noise_seeds": list(run.cfg.lds.noise_seeds), "models": [j.name for j in jobs],
            "dtype": run.cfg.runtime.dtype,
            "targets_sha1": _targets_sha1(targets)}


def _targets_sha1(targets) -> str:
    """Content hash of the targets: an image tensor's bytes, or an example set's digest."""
    if isinstance(targets, torch.Tensor):
        return hashlib.sha1(targets.float().numpy().tobytes()).hexdigest()
    return digest(targets)


def pool_losses(run: Run, pool: Pool, jobs: Sequence[TrainJob], set_name: str,
                targets: torch.Tensor) -> np.ndarray:
    """``[S, M, T]`` losses of the pool's models on the targets (resumable per model)."""
    c = run.cfg.lds
    S, M = len(c.seeds), len(jobs) // len(c.seeds)
    path = pool.truth(set_name)
    done_path = path.with_name(f"{set_name}.done.npy")
    meta_path = path.with_name(f"{set_name}.json")
    T = run.cfg.model.num_train_timesteps
    ts = timesteps("uniform", min(c.eval_timesteps, T), T)
    meta = _table_meta(run, jobs, targets, ts)
    path.parent.mkdir(parents=True, exist_ok=True)
    same = (path.exists() and done_path.exists() and meta_path.exists()
            and json.loads(meta_path.read_text()) == meta)
    if same:
        truth, done = load_npy(path, meta["shape"]), load_npy(done_path, (S, M))
    else:
        truth, done = np.zeros(meta["shape"]), np.zeros((S, M), dtype=bool)
        meta_path.write_text(json.dumps(meta))
    sched = run.context.sched
    todo = [(si, m) for si in range(S) for m in range(M) if not done[si, m]]
    for si, m in tqdm(todo, desc=f"{pool.name} losses {set_name}", disable=not run.progress,
                      leave=False):
        model = run.load_model(Path(jobs[m * S + si].directory) / "unet")
        truth[si, m] = model_losses(run.family.adapter(model), targets, sched, ts, c.noise_seeds)
        done[si, m] = True
        save_npy(path, truth)
        save_npy(done_path, done)
    return truth


def ensure_pool(run: Run, method: Method, set_names: Iterable[str]) -> None:
    """Train the pool models a method reads and write their loss tables (no-op without
    :attr:`~dtrak.methods.Method.pool`)."""
    need = method.pool
    if need is None:
        return
    pool = attribution_pool(run)
    if need.members is None:
        jobs = train_pool(run, pool, desc=f"pool models ({method.name})")
    else:
        if run.cfg.lds.n_subsets < need.members:
            raise ValueError(f"{method.name} needs {need.members} pool models but "
                             f"lds.n_subsets = {run.cfg.lds.n_subsets} sets the pool size; "
                             "raise it")
        S = len(run.cfg.lds.seeds)
        all_jobs = pool_jobs(run, pool, pool_masks(run, pool))
        members = all_jobs[: need.members * S : S]  # subset m, the first seed
        jobs = train_pool(run, pool, only=members, desc=f"{method.name} models")
    if need.losses:
        for set_name in set_names:
            pool_losses(run, pool, jobs, set_name, run.context.examples(set_name))
