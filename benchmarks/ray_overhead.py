"""Per-job overhead of the Ray executor against the local one, on this machine.

Runs the same farms on each executor and prints a Markdown table of wall-clock seconds:
  - 2 and N trivial jobs (each writes its done file): a farm's fixed cost (two jobs start
    both workers), and the executor's own cost per extra job, (t_N - t_2) / (N - 2);
  - M tiny training jobs (the tiny preset's UNet, a few steps on 8x8 images);
  - the same N jobs again when all are done (what a resumed farm costs before any work).
Executors: local with 1 worker (in this process), local with 2 worker processes (a new pool
per farm), and Ray on a local Ray with 2 CPUs (1 CPU per job), started by dtrak once per
process: its start and its first farm (which starts its workers) are printed apart; the
table's Ray farms reuse the workers. Each cell is the best of ``--repeat`` farms.

Usage:
    python benchmarks/ray_overhead.py [--trivial 20] [--train 4] [--steps 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dtrak import ray_executor
from dtrak.config import preset, to_dict
from dtrak.farm import Job, LocalExecutor, TrainJob
from dtrak.ray_executor import RayExecutor


def touch(payload: dict) -> None:
    """A trivial job: write its done file."""
    Path(payload["done"]).write_text("done")


def trivial_jobs(root: Path, n: int) -> list[Job]:
    root.mkdir(parents=True)
    return [Job(f"t{i}", touch, {"done": str(root / f"t{i}")}, str(root / f"t{i}"))
            for i in range(n)]


def train_jobs(root: Path, m: int, steps: int) -> list[Job]:
    cfg = preset("tiny")
    images = root / "images.npy"
    root.mkdir(parents=True)
    np.save(images, np.random.default_rng(0).uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32))
    train = to_dict(dataclasses.replace(cfg.train, steps=steps, checkpoint_every=steps))
    return [TrainJob(f"m{i}", str(root / f"m{i}"), str(images), tuple(range(i, 32, 2)),
                     to_dict(cfg.model), train, seed=i).as_job("cpu") for i in range(m)]


def timed(executor, jobs: list[Job]) -> float:
    t0 = time.perf_counter()
    executor.run(jobs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trivial", type=int, default=20, help="trivial jobs per farm")
    ap.add_argument("--train", type=int, default=4, help="tiny training jobs per farm")
    ap.add_argument("--steps", type=int, default=20, help="training steps per job")
    ap.add_argument("--repeat", type=int, default=3, help="farms of each kind (best kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    count = iter(range(10**6))

    def farm(make, jobs) -> float:
        """Seconds of one farm on a fresh executor (jobs made in a fresh directory)."""
        return timed(make(), jobs(tmp / str(next(count))))

    def done_farm(root: Path) -> list[Job]:
        jobs = trivial_jobs(root, args.trivial)
        for job in jobs:
            touch(job.payload)
        return jobs

    def measure(make) -> tuple:
        """Best of ``--repeat``: 2 trivial jobs, N trivial jobs, M trainings, N done jobs."""
        kinds = [lambda r: trivial_jobs(r, 2), lambda r: trivial_jobs(r, args.trivial),
                 lambda r: train_jobs(r, args.train, args.steps), done_farm]
        best: list[float | str] = []
        for jobs in kinds:
            try:
                best.append(min(farm(make, jobs) for _ in range(args.repeat)))
            except ValueError as e:  # LocalExecutor(2) on a farm with nothing left to do
                best.append(f"fails: {e}")
        return tuple(best)

    rows = {"local, 1 worker (in process)": measure(lambda: LocalExecutor(1, progress=False)),
            "local, 2 processes": measure(lambda: LocalExecutor(2, progress=False))}
    t0 = time.perf_counter()
    ray_executor.connect(None, num_cpus=2)
    t_start = time.perf_counter() - t0
    # the first farm also starts Ray's workers (they import torch and dtrak); later ones reuse
    t_first = farm(lambda: RayExecutor(workers=2, progress=False),
                   lambda r: trivial_jobs(r, args.trivial))
    rows["ray, 2 CPUs, 1 per job"] = measure(lambda: RayExecutor(workers=2, progress=False))
    ray_executor.shutdown()

    import ray

    print(f"{platform.node()}: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, ray {ray.__version__}; "
          f"best of {args.repeat}\n")
    print(f"ray: start (ray.init) {t_start:.1f} s, then its first farm of {args.trivial} "
          f"trivial jobs (starting the workers) {t_first:.1f} s\n")
    print(f"| executor | 2 trivial jobs (s) | {args.trivial} trivial jobs (s) | per extra job "
          f"(ms) | {args.train} tiny trainings, {args.steps} steps (s) | "
          f"{args.trivial} jobs already done (s) |")
    print("|---|---|---|---|---|---|")
    for name, (t_two, t_many, t_train, t_done) in rows.items():
        per_job = 1000 * (t_many - t_two) / max(1, args.trivial - 2)
        done = t_done if isinstance(t_done, str) else f"{t_done:.3f}"
        print(f"| {name} | {t_two:.2f} | {t_many:.2f} | {per_job:.0f} | {t_train:.2f} "
              f"| {done} |")


if __name__ == "__main__":
    main()
