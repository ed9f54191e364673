"""Device, dtype, executor and model family: how and where a run computes, never what."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrak import pipeline
from dtrak.config import ConfigError, RuntimeConfig, from_dict, load_config, preset, to_dict
from dtrak.families import FAMILIES, UNet2DAdapter, get_family, register_family
from dtrak.families.unet2d import UNet2DFamily, build_unet
from dtrak.farm import Job, LocalExecutor, make_executor
from dtrak.featurize import FeatureSpec, featurize_into
from dtrak.noise import ScheduleConstants
from dtrak.projection import make_projector
from dtrak.runtime import placement, resolve_device
from dtrak.scoring import KernelSolver

STAGES = ("data", "train", "generate", "featurize", "score")


class CountingFamily(UNet2DFamily):
    """unet2d under another name, counting what the stages ask of it."""

    name = "counting-unet2d"
    calls: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def build(self, *args, **kwargs):
        self._count("build")
        return super().build(*args, **kwargs)

    def load(self, directory):
        self._count("load")
        return super().load(directory)

    def adapter(self, model):
        self._count("adapter")
        return super().adapter(model)

    def sample(self, *args, **kwargs):
        self._count("sample")
        return super().sample(*args, **kwargs)


def _tiny(**runtime):
    cfg = preset("tiny")
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=10),
        sampling=dataclasses.replace(cfg.sampling, n_images=4, steps=3),
        attribution=dataclasses.replace(cfg.attribution, n_targets=4, methods=("trak", "dtrak")),
        runtime=dataclasses.replace(cfg.runtime, threads=1, **runtime))


def _outputs(root: Path) -> dict[str, np.ndarray]:
    files = sorted(root.glob("scores/*/*.npy")) + sorted(root.glob("features/**/features.npy"))
    return {str(f.relative_to(root)): np.load(f) for f in files}


def test_auto_and_cpu_runs_agree_and_stages_reach_models_through_the_family(tmp_path):
    """The tiny pipeline with runtime.device = cpu, and = auto through a registered family."""
    cpu = pipeline.open_run(tmp_path / "cpu", _tiny(device="cpu"), progress=False)
    pipeline.run_stages(cpu, STAGES)
    assert cpu.placement.device == torch.device("cpu")
    register_family(CountingFamily())
    try:
        cfg = _tiny(device="auto")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 family="counting-unet2d"))
        auto = pipeline.open_run(tmp_path / "auto", cfg, progress=False)
        pipeline.run_stages(auto, STAGES)
    finally:
        FAMILIES.pop("counting-unet2d")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.placement.device.type == expected
    assert json.loads((tmp_path / "auto" / "stages.json").read_text())["train"]["device"] \
        .startswith(expected)
    timings = [json.loads(line) for line in
               (tmp_path / "auto" / "timings.jsonl").read_text().splitlines()]
    assert [t["stage"] for t in timings] == list(STAGES)  # one line per stage call
    assert all(t["seconds"] >= 0 for t in timings)
    # training built the model, generation sampled, featurization loaded and adapted it
    assert {"build", "load", "adapter", "sample"} <= set(CountingFamily.calls)
    a, b = _outputs(tmp_path / "cpu"), _outputs(tmp_path / "auto")
    assert a.keys() == b.keys() and len(a) >= 8
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5 * np.abs(a[key]).max(),
                                   err_msg=key)


def test_float64_features_agree_with_float32(tmp_path):
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sched = ScheduleConstants.from_scheduler(get_family("unet2d").scheduler(preset("tiny").model))
    spec = FeatureSpec(output="square", n_timesteps=2, projector="gaussian", proj_dim=32)
    feats = {}
    for dtype in ("float32", "float64"):
        place = placement(RuntimeConfig(device="cpu", dtype=dtype))
        m = place.put(build_unet(preset("tiny").model, 1, 8, seed=0))
        assert next(m.parameters()).dtype == place.dtype
        feats[dtype] = featurize_into(UNet2DAdapter(m), x, tmp_path / dtype, spec, sched, "m",
                                      "train", progress=False).load()
    del model
    np.testing.assert_allclose(feats["float64"], feats["float32"], rtol=1e-4,
                               atol=1e-5 * np.abs(feats["float32"]).max())


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    for bad in ("gpu", "cuda:x", "cpu:1"):
        with pytest.raises(ConfigError, match="runtime.device"):
            RuntimeConfig(device=bad).validate()
    with pytest.raises(ConfigError, match="runtime.dtype"):
        RuntimeConfig(dtype="float16").validate()


def test_keys_of_earlier_versions_still_load(tmp_path):
    cfg = from_dict({"torch_threads": 1, "lds": {"workers": 2, "n_subsets": 5}})
    assert cfg.runtime.threads == 1 and cfg.runtime.workers == 2 and cfg.lds.n_subsets == 5
    # a run saved before runtime and model.family existed opens without a config change
    old = to_dict(preset("tiny"))
    old.pop("runtime")
    old["model"].pop("family")
    old["torch_threads"], old["lds"]["workers"] = 1, 1
    (tmp_path / "config.json").write_text(json.dumps(old))
    run = pipeline.open_run(tmp_path, load_config("tiny"), progress=False)
    assert run.cfg.model.family == "unet2d"
    with pytest.raises(ConfigError, match="model.family"):
        get_family("nope")


def _touch(payload: dict) -> str:
    Path(payload["path"]).write_text(payload["text"])
    return payload["text"]


def test_executors_run_plain_jobs_once(tmp_path):
    jobs = [Job(f"j{i}", _touch, {"path": str(tmp_path / f"{i}.txt"), "text": str(i)},
                done_file=str(tmp_path / f"{i}.txt")) for i in range(3)]
    (tmp_path / "1.txt").write_text("done before")
    LocalExecutor(2, progress=False).run(jobs)
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(3)] == ["0", "done before", "2"]
    LocalExecutor(2, progress=False).run(jobs)  # all done: nothing to start, nothing rerun
    executor = make_executor(RuntimeConfig(workers=1), progress=False)
    assert isinstance(executor, LocalExecutor) and executor.workers == 1
    with pytest.raises(ConfigError, match="runtime.executor"):
        make_executor(RuntimeConfig(executor="nope"))


@pytest.mark.cuda
@pytest.mark.parametrize("projector", ["sjlt", "srht", "gaussian"])
def test_features_and_scores_on_cuda_equal_the_cpu_ones(tmp_path, projector):
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sched = ScheduleConstants.from_scheduler(get_family("unet2d").scheduler(preset("tiny").model))
    spec = FeatureSpec(output="square", n_timesteps=3, projector=projector, proj_dim=64)
    feats = {}
    for device in ("cpu", "cuda"):
        model = build_unet(preset("tiny").model, 1, 8, seed=0).to(device)
        feats[device] = featurize_into(UNet2DAdapter(model), x, tmp_path / device, spec, sched,
                                       "m", "train", batch_size=4, progress=False).load()
    np.testing.assert_allclose(feats["cuda"], feats["cpu"], rtol=1e-3,
                               atol=1e-4 * np.abs(feats["cpu"]).max())
    # scores: the kernel factorised on the GPU from the GPU's features, against the CPU's
    cpu = KernelSolver(feats["cpu"][:8]).scores(feats["cpu"][8:], 0.1)
    gpu = KernelSolver(feats["cuda"][:8], device="cuda").scores(feats["cuda"][8:], 0.1)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-3 * np.abs(cpu).max())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "srht", "sjlt"])
def test_projectors_on_cuda_equal_their_cpu_versions(kind):
    g = torch.randn(8, 3000, generator=torch.Generator().manual_seed(0))
    proj = make_projector(kind, 3000, 256, seed=1, model_id=2)
    want = proj.project(g)
    got = proj.project(g.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    # the seeded tables are copied to the device once, not per batch
    torch.testing.assert_close(proj.project(g.cuda()).cpu(), got.cpu(), rtol=0, atol=0)


@pytest.mark.cuda
def test_a_tiny_run_on_cuda_puts_every_stage_there(tmp_path):
    run = pipeline.open_run(tmp_path / "gpu", _tiny(device="cuda"), progress=False)
    pipeline.run_stages(run, STAGES)
    stages = json.loads((tmp_path / "gpu" / "stages.json").read_text())
    assert stages["train"]["device"].startswith("cuda")
    assert run.context.adapter().module.device.type == "cuda"
    assert len(_outputs(tmp_path / "gpu")) >= 8
