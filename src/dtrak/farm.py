"""Farms of independent jobs: the job table of models to train, and the executors that run jobs.

A :class:`Job` is a module-level function and a JSON-able payload (paths, not tensors), so
any engine can run it anywhere: in this process, in worker processes, or on a cluster. Its
``done_file`` tells whether it finished, so a finished job is never redone; a killed one
resumes from its own checkpoints (training) or store (featurization).

A :class:`TrainJob` is the plain data of one model to train (what, on which indices, with
which seeds, where to write). The LDS subsets, the model pools of empirical influence,
datamodels and ensembles, and the counterfactual retrainings are tables of TrainJobs
(``jobs.json``); :func:`train_jobs` turns them into Jobs.

Every stage gets its executor from :func:`make_executor` (``runtime.executor``,
``runtime.workers``): the one place an executor is built. An executor is one class with a
``run(jobs, desc)`` method plus one line in :data:`EXECUTORS`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .artefacts import open_npy
from .config import ConfigError, ModelConfig, RuntimeConfig, TrainConfig, section_from_dict, to_dict
from .families import CaptionedImages, get_family
from .ray_executor import RayExecutor
from .runtime import resolve_device, set_threads
from .train import train_model

log = logging.getLogger(__name__)

__all__ = [
    "EXECUTORS",
    "Executor",
    "Job",
    "LocalExecutor",
    "TrainJob",
    "load_jobs",
    "make_executor",
    "pending",
    "run_job",
    "same_job",
    "save_jobs",
    "train_jobs",
]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(payload)``. ``fn`` must be a module-level function (picklable)."""

    name: str
    fn: Callable[[dict], Any]
    payload: dict
    done_file: str | None = None

    @property
    def done(self) -> bool:
        return self.done_file is not None and Path(self.done_file).exists()


class Executor(Protocol):
    """Runs jobs, skipping finished ones; returns when every job has finished."""

    def run(self, jobs: Sequence[Job], desc: str = "jobs") -> None: ...


# ----------------------------------------------------------------------------- training jobs


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

    def as_job(self, device: str = "cpu") -> Job:
        return Job(self.name, run_train_payload, {"job": self.to_dict(), "device": device},
                   str(Path(self.directory) / "done.json"))


_PATHS = ("directory", "images")  # where a job reads and writes: not part of what it is


def _identity(d: dict) -> dict:
    """What a job is (name, indices, recipe, seeds), with each recipe resolved through its
    config section (defaults filled in, so tables written before a key existed still match);
    its paths are left out, so a moved or copied run directory keeps its table."""
    d = json.loads(json.dumps(d))
    out = {k: v for k, v in d.items() if k not in _PATHS}
    out["model"] = to_dict(section_from_dict(ModelConfig, d["model"], "model"))
    out["train"] = to_dict(section_from_dict(TrainConfig, d["train"], "train"))
    return out


def same_job(a: TrainJob, b: TrainJob) -> bool:
    return _identity(a.to_dict()) == _identity(b.to_dict())


def _relative(d: dict, root: Path | None) -> dict:
    if root is None:
        return d
    out = dict(d)
    for key in _PATHS:
        p = Path(d[key]).absolute()
        if p.is_relative_to(root):
            out[key] = str(p.relative_to(root))
    return out


def save_jobs(jobs: Sequence[TrainJob], path: str | Path, root: str | Path | None = None
              ) -> None:
    """Write the job table; an existing table must list the same jobs.

    With ``root`` (the run directory) paths under it are written relative to it, so the run
    directory can be moved or copied.
    """
    path = Path(path)
    root = None if root is None else Path(root).absolute()
    table = [_relative(j.to_dict(), root) for j in jobs]
    if path.exists():
        old = json.loads(path.read_text())
        if [_identity(d) for d in old] != [_identity(d) for d in table]:
            raise ValueError(
                f"{path} lists different jobs (the subsets, seeds or recipe changed); "
                "use another run directory or --overwrite"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    tmp.replace(path)


def load_jobs(path: str | Path, root: str | Path | None = None) -> list[TrainJob]:
    """The job table; relative paths are resolved against ``root`` (the run directory)."""
    jobs = []
    for d in json.loads(Path(path).read_text()):
        if root is not None:
            d = {**d, **{k: str(Path(root) / d[k]) for k in _PATHS
                         if not Path(d[k]).is_absolute()}}
        jobs.append(TrainJob.from_dict(d))
    return jobs


def pending(jobs: Iterable[TrainJob | Job]) -> list:
    return [j for j in jobs if not j.done]


def run_job(job: TrainJob | dict, progress: bool = False, device: str = "cpu") -> str:
    """Train one job (resuming if it was interrupted); returns its name."""
    job = TrainJob.from_dict(job) if isinstance(job, dict) else job
    images = open_npy(job.images, mode="r")
    data = torch.from_numpy(np.ascontiguousarray(images[np.asarray(job.indices)]))
    captions = Path(job.images).with_suffix(".captions.json")
    if captions.exists():  # a text-conditioned family: each image with its caption
        texts = json.loads(captions.read_text())
        data = CaptionedImages(data, tuple(texts[i] for i in job.indices))
    model_cfg = section_from_dict(ModelConfig, job.model, "model")
    train_cfg = section_from_dict(TrainConfig, job.train, "train")
    pointer = Path(job.images).with_suffix(".cache.json")
    if pointer.exists():  # the training set's encodings, cached by the run: read, not redone
        cache = pointer.parent / json.loads(pointer.read_text())["directory"]
        data = get_family(model_cfg.family).cached_examples(
            data, model_cfg, cache, flips=train_cfg.hflip, device=resolve_device(device),
            indices=job.indices)
    train_model(
        data,
        model_cfg,
        train_cfg,
        job.directory,
        seed=job.seed,
        init_seed=job.init_seed,
        noise_seed=job.noise_seed,
        progress=progress,
        desc=job.name,
        device=resolve_device(device),
    )
    return job.name


def run_train_payload(payload: dict) -> str:
    """The function of a training :class:`Job` (what worker processes run)."""
    return run_job(payload["job"], device=payload.get("device", "cpu"))


def train_jobs(jobs: Sequence[TrainJob], runtime: RuntimeConfig) -> list[Job]:
    """Training jobs for an executor, on the run's device."""
    return [j.as_job(runtime.device) for j in jobs]


# ----------------------------------------------------------------------------- executors


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _die_with_parent(parent: int) -> None:
    """End this worker when ``parent`` dies, even by SIGKILL.

    multiprocessing has no option for this: the workers of a killed parent keep training until
    their job ends, so it is written by hand. On Linux the kernel sends SIGTERM when the parent
    dies (prctl PR_SET_PDEATHSIG = 1; it fires when the parent *thread* that started the
    worker exits). A daemon thread that polls the parent pid covers the other systems.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):  # an initializer that raises makes Pool respawn forever
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable; polling the parent pid only")
    if os.getppid() != parent:  # died before the line above
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _worker_init(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    # Two processes with two OpenMP threads each on two cores run 10-50x slower:
    # every worker gets its own share of the cores.
    torch.set_num_threads(threads)


def _call(item: tuple[Callable[[dict], Any], dict]) -> Any:
    fn, payload = item
    return fn(payload)


def _as_job(job: Job | TrainJob) -> Job:
    return job.as_job() if isinstance(job, TrainJob) else job


class LocalExecutor:
    """Runs jobs in ``workers`` processes on this machine (spawned, one torch thread each)."""

    def __init__(self, workers: int = 1, threads_per_worker: int | None = None,
                 progress: bool = True) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        # None: in-process (one worker) keeps the caller's thread setting; worker processes
        # share the cores between them.
        self.threads = threads_per_worker
        if workers > 1:
            share = max(1, (mp.cpu_count() or 1) // workers)
            if self.threads is not None and self.threads > share:
                log.warning("%d workers x %d torch threads would oversubscribe %d cores; each "
                            "worker gets %d thread(s) (runtime.threads is for the main "
                            "process and one-worker farms)", workers, self.threads,
                            mp.cpu_count(), share)
            self.threads = share if self.threads is None else min(self.threads, share)
        self.progress = progress

    def run(self, jobs: Sequence[Job | TrainJob], desc: str = "jobs") -> None:
        jobs = [_as_job(j) for j in jobs]
        todo = pending(jobs)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc,
                   disable=not self.progress)
        if self.workers == 1:
            set_threads(self.threads)
            for job in todo:
                job.fn(job.payload)
                bar.update()
        elif todo:  # nothing left to run: no pool to start
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(self.workers, len(todo)), initializer=_worker_init,
                          initargs=(self.threads, os.getpid())) as pool:
                for _ in pool.imap_unordered(_call, [(j.fn, j.payload) for j in todo]):
                    bar.update()
        bar.close()


def _local(runtime: RuntimeConfig, progress: bool) -> Executor:
    return LocalExecutor(runtime.workers, threads_per_worker=runtime.threads, progress=progress)


#: Executors by name (``runtime.executor``): a factory of (runtime config, progress bars).
EXECUTORS: dict[str, Callable[[RuntimeConfig, bool], Executor]] = {
    "local": _local,
    "ray": RayExecutor.from_runtime,  # dtrak.ray_executor: a local Ray or a cluster
}


def make_executor(runtime: RuntimeConfig, progress: bool = True) -> Executor:
    """The executor of a run: the one place executors are built."""
    if runtime.executor not in EXECUTORS:
        raise ConfigError(f"runtime.executor: unknown {runtime.executor!r}; known: "
                          f"{', '.join(EXECUTORS)}")
    return EXECUTORS[runtime.executor](runtime, progress)
