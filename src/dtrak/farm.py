"""The retraining farm: a job table of models to train, and executors that run it.

A :class:`TrainJob` is plain data (what to train, on which indices, with which seeds, where
to write) and serialises to JSON, so the same table can be handed to any engine: the
:class:`LocalExecutor` here runs pending jobs in worker processes on one machine; a cluster
engine only needs to call :func:`run_job` on each spec.

The table lives in ``jobs.json``; a job's state is read from its directory (``done.json``
written last by training), so a finished job is never redone and a killed one resumes from
its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["LocalExecutor", "TrainJob", "load_jobs", "pending", "run_job", "save_jobs"]


@dataclass(frozen=True)
class TrainJob:
    """One model to train. ``images`` is an ``.npy`` file [N, C, H, W] in [-1, 1]."""

    name: str
    directory: str
    images: str
    indices: tuple[int, ...]
    model: dict
    train: dict
    seed: int
    init_seed: int | None = None
    noise_seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainJob:
        return cls(**{**d, "indices": tuple(d["indices"])})

    @property
    def done(self) -> bool:
        return (Path(self.directory) / "done.json").exists()


def save_jobs(jobs: Sequence[TrainJob], path: str | Path) -> None:
    """Write the job table; an existing table must list the same jobs."""
    path = Path(path)
    table = [j.to_dict() for j in jobs]
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(table)):
            raise ValueError(
                f"{path} lists different jobs (the subsets, seeds or recipe changed); "
                "use another run directory or --overwrite"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))


def load_jobs(path: str | Path) -> list[TrainJob]:
    return [TrainJob.from_dict(d) for d in json.loads(Path(path).read_text())]


def pending(jobs: Iterable[TrainJob]) -> list[TrainJob]:
    return [j for j in jobs if not j.done]


def run_job(job: TrainJob | dict, progress: bool = False) -> str:
    """Train one job (resuming if it was interrupted); returns its name."""
    from .config import ModelConfig, TrainConfig, section_from_dict
    from .train import train_model

    job = TrainJob.from_dict(job) if isinstance(job, dict) else job
    images = np.load(job.images, mmap_mode="r")
    import torch

    data = torch.from_numpy(np.ascontiguousarray(images[np.asarray(job.indices)]))
    train_model(
        data,
        section_from_dict(ModelConfig, job.model, "model"),
        section_from_dict(TrainConfig, job.train, "train"),
        job.directory,
        seed=job.seed,
        init_seed=job.init_seed,
        noise_seed=job.noise_seed,
        progress=progress,
        desc=job.name,
    )
    return job.name


def _worker_init(threads: int) -> None:
    import torch

    # Two processes with two OpenMP threads each on two cores run 10-50x slower:
    # every worker gets its own share of the cores.
    torch.set_num_threads(threads)


class LocalExecutor:
    """Runs jobs in ``workers`` processes (spawned, one torch thread each by default)."""

    def __init__(self, workers: int = 1, threads_per_worker: int | None = None,
                 progress: bool = True) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        # None: in-process (one worker) keeps the caller's thread setting; worker processes
        # share the cores between them.
        self.threads = threads_per_worker
        if self.threads is None and workers > 1:
            self.threads = max(1, (mp.cpu_count() or 1) // workers)
        self.progress = progress

    def run(self, jobs: Sequence[TrainJob], desc: str = "retrain") -> None:
        todo = pending(jobs)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc,
                   disable=not self.progress)
        if self.workers == 1:
            if self.threads is not None:
                _worker_init(self.threads)
            for job in todo:
                run_job(job, progress=False)
                bar.update()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(self.workers, initializer=_worker_init,
                          initargs=(self.threads,)) as pool:
                for _ in pool.imap_unordered(run_job, [j.to_dict() for j in todo]):
                    bar.update()
        bar.close()
