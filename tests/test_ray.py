"""Ray as the executor (``runtime.executor = "ray"``): same results as the local executor,
killed workers retried and resumed from their checkpoints, farms split between executors.

The Ray tests share one local Ray (2 CPUs, no dashboard) started once for the module, and
skip where Ray is not installed (``pip install "dtrak[ray]"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrak import pipeline, ray_executor
from dtrak.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    preset,
    section_from_dict,
    to_dict,
)
from dtrak.families.unet2d import load_unet
from dtrak.farm import Job, TrainJob, make_executor, run_job
from dtrak.ray_executor import RayExecutor
from dtrak.stages.featurize import feature_jobs
from dtrak.stages.pools import lds_pool, pool_jobs, pool_masks, train_pool
from dtrak.train import latest_checkpoint, train_model


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    ray_executor.connect(None, num_cpus=2)  # what a run with ray_address unset does
    # the job functions of this module travel by value (workers need not import the tests)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray_executor.shutdown()


def _tiny(executor: str):
    cfg = preset("tiny")
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=10),
        sampling=dataclasses.replace(cfg.sampling, n_images=4, steps=3),
        attribution=dataclasses.replace(cfg.attribution, n_targets=4, methods=("trak", "dtrak")),
        lds=dataclasses.replace(cfg.lds, n_subsets=3, seeds=(0,)),
        runtime=dataclasses.replace(cfg.runtime, threads=1, executor=executor, workers=1,
                                    device="cpu"))


def _results(root: Path) -> dict:
    """Every number a run's LDS depends on, by file (timings left out)."""
    files = [root / "lds" / "masks.npy", *sorted(root.glob("lds/truth/*.npy")),
             *sorted(root.glob("scores/*/*.npy")), *sorted(root.glob("features/**/features.npy"))]
    out = {str(f.relative_to(root)): np.load(f) for f in files}
    lds = json.loads((root / "results" / "lds.json").read_text())
    lds["settings"].pop("seconds", None)
    for record in lds["records"]:
        record.pop("seconds", None)
    out["results/lds.json"] = lds
    for unet in sorted(root.glob("lds/models/*/unet")):
        params = torch.cat([p.detach().flatten() for p in load_unet(unet).parameters()])
        out[str(unet.relative_to(root))] = params.numpy()
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert len([k for k in a if "lds/models" in k]) == 3
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _pipeline(root: Path, executor: str) -> Path:
    """The tiny pipeline through the LDS; every farm on ``executor``: the LDS subset models,
    and the featurization as two shard jobs (the featurize stage then finds its stores full;
    the shards' batch layout differs from the stage's own, so both runs use shards)."""
    run = pipeline.open_run(root, _tiny(executor), progress=False)
    pipeline.run_stages(run, ("data", "train", "generate"))
    run.executor().run(feature_jobs(run, 2), desc="feature shards")
    pipeline.run_stages(run, ("featurize", "score", "lds"))
    return root


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    return _pipeline(tmp_path_factory.mktemp("local") / "run", "local")


# ----------------------------------------------------------------------------- config


def test_runtime_keys_are_validated_and_result_neutral():
    cfg = apply_overrides(preset("tiny"), ["runtime.executor=ray", "runtime.num_cpus=0.5",
                                           "runtime.num_gpus=2", "runtime.ray_address=auto"])
    cfg.validate()
    assert (cfg.runtime.num_cpus, cfg.runtime.num_gpus) == (0.5, 2.0)
    for override, message in [("runtime.num_cpus=0", "runtime.num_cpus: must be > 0"),
                              ("runtime.num_gpus=-1", "runtime.num_gpus: must be 0 or > 0"),
                              ("runtime.num_gpus=1.5", "share of one GPU"),
                              ("runtime.ray_address=somewhere", "runtime.ray_address")]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(preset("tiny"), [override]).validate()
    from dtrak.stages.run import RESULT_NEUTRAL_KEYS

    assert {"runtime.ray_address", "runtime.num_cpus", "runtime.num_gpus"} <= RESULT_NEUTRAL_KEYS


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(ray_executor.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'pip install "dtrak\[ray\]"'):
        make_executor(_tiny("ray").runtime)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ConfigError, match=r'pip install "dtrak\[ray\]"'):
        ray_executor.connect(None)


# ----------------------------------------------------------------------------- jobs on Ray


def _write(payload: dict) -> None:
    Path(payload["file"]).write_text(str(os.getpid()))


def _fail(payload: dict) -> None:
    raise ValueError(f"job {payload['i']} is broken")


def test_finished_jobs_are_not_submitted_and_failures_keep_their_type(ray, tmp_path):
    done = tmp_path / "done"
    done.write_text("old")
    jobs = [Job("done", _fail, {"i": 0}, str(done)),  # would fail if it ran
            *[Job(f"w{i}", _write, {"file": str(tmp_path / f"w{i}")}, str(tmp_path / f"w{i}"))
              for i in range(3)]]
    executor = make_executor(_tiny("ray").runtime, progress=False)
    assert isinstance(executor, RayExecutor)
    executor.run(jobs)
    assert done.read_text() == "old" and all(j.done for j in jobs)
    assert {int((tmp_path / f"w{i}").read_text()) for i in range(3)}.isdisjoint({os.getpid()})
    assert (executor.retries, executor.failures) == (0, 0)
    with pytest.raises(ValueError, match=r"job \d is broken") as info:
        executor.run([Job(f"f{i}", _fail, {"i": i}) for i in range(2)], desc="broken jobs")
    assert "2 of 2 broken jobs failed on Ray" in "\n".join(info.value.__notes__)
    assert executor.failures == 2
    # a job that could never start on this (local) Ray is refused, not left waiting
    with pytest.raises(ConfigError, match="a job asks for 64 CPUs, the Ray cluster has 2"):
        RayExecutor(num_cpus=64, progress=False).run(
            [Job("big", _write, {"file": str(tmp_path / "big")})])


def _train_killed_once(payload: dict) -> None:
    """A training job whose worker is killed (SIGKILL) after its first checkpoint, once."""
    job = TrainJob.from_dict(payload["job"])
    directory, marker = Path(job.directory), Path(payload["marker"])
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(directory)
    with open(directory / "attempts.txt", "a") as f:  # where each attempt started
        f.write(f"{ckpt.name if ckpt else 'start'}\n")

    def die(step: int) -> None:
        if not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)

    data = torch.from_numpy(np.load(job.images)[list(job.indices)])
    train_model(data, section_from_dict(ModelConfig, job.model, "model"),
                section_from_dict(TrainConfig, job.train, "train"), job.directory,
                seed=job.seed, progress=False, on_checkpoint=die)


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(ray, tmp_path):
    cfg = preset("tiny")
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32))
    train = {**to_dict(cfg.train), "steps": 6, "checkpoint_every": 2}
    killed = TrainJob("killed", str(tmp_path / "killed"), str(images), tuple(range(16)),
                      to_dict(cfg.model), train, seed=3)
    executor = RayExecutor(workers=2, progress=False)
    executor.run([Job("killed", _train_killed_once,
                      {"job": killed.to_dict(), "marker": str(tmp_path / "marker")},
                      str(tmp_path / "killed" / "done.json"))])
    assert (tmp_path / "marker").read_text() == "2"  # the first attempt died after step 2
    attempts = (tmp_path / "killed" / "attempts.txt").read_text().split()
    assert attempts == ["start", "step-0000002"]  # Ray retried it; it resumed at step 2
    assert executor.retries == 1 and executor.failures == 0
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "killed" / "stats.jsonl").read_text().splitlines()]
    assert steps == [6]
    # the same model trained without interruption, in this process
    run_job(dataclasses.replace(killed, name="whole", directory=str(tmp_path / "whole")))
    a, b = (load_unet(tmp_path / d / "unet") for d in ("killed", "whole"))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- the pipeline


def test_the_pipeline_on_ray_equals_the_local_executor(ray, local_run, tmp_path):
    _assert_same(_results(local_run), _results(_pipeline(tmp_path / "ray", "ray")))


def test_half_the_farm_local_the_rest_on_ray(ray, local_run, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(local_run, root)
    for stale in ("lds/models", "lds/truth", "results"):
        shutil.rmtree(root / stale)
    local = pipeline.open_run(root, _tiny("local"), progress=False)
    pool = lds_pool(local)
    jobs = pool_jobs(local, pool, pool_masks(local, pool))
    train_pool(local, pool, only=jobs[:2])
    finished = {j.name: (Path(j.directory) / "done.json").stat().st_mtime_ns for j in jobs[:2]}
    assert not jobs[2].done
    pipeline.run_stages(pipeline.open_run(root, _tiny("ray"), progress=False), ("lds",))
    assert {j.name: (Path(j.directory) / "done.json").stat().st_mtime_ns
            for j in jobs[:2]} == finished  # not redone
    _assert_same(_results(local_run), _results(root))
