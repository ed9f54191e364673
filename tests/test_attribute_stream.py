"""`dtrak attribute --stream`: the streamed scores equal the in-memory ones."""

import dataclasses

import numpy as np
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from dtrak.cli import main
from dtrak.config import DataConfig, preset
from dtrak.families.unet2d import build_unet, save_unet
from dtrak.featurize import FeatureSpec
from dtrak.images import save_pngs
from dtrak.stages.attribute import attribute_images
from dtrak.stages.run import open_run


def test_streamed_attribution_equals_the_in_memory_one(tmp_path):
    save_unet(build_unet(preset("tiny").model, 1, 8, seed=0), tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "sched")
    g = torch.Generator().manual_seed(0)
    save_pngs(torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "train")
    save_pngs(torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "targets")
    cache = tmp_path / "cache"

    def attribute(stream):
        return attribute_images(tmp_path / "unet", tmp_path / "train", [tmp_path / "targets"],
                                FeatureSpec(n_timesteps=2, proj_dim=8), cache_dir=cache,
                                progress=False, device="cpu", scheduler=tmp_path / "sched",
                                stream=stream)

    memory, streamed = attribute(False), attribute(True)
    assert len(list(cache.glob("*/kernel-attribute/eigenvectors.npy"))) == 1  # cached
    for a, b in zip(memory, streamed, strict=True):
        assert a.lam_rel == b.lam_rel and a.target == b.target
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5,
                                   atol=1e-6 * np.abs(a.scores).max())
        assert [i for i, *_ in a.top(3)] == [i for i, *_ in b.top(3)]
    args = ["attribute", "--model", str(tmp_path / "unet"), "--scheduler", str(tmp_path / "sched"),
            "--data", str(tmp_path / "train"), str(tmp_path / "targets"), "--timesteps", "2",
            "--proj-dim", "8", "--top", "3", "--cache", str(cache), "--out",
            str(tmp_path / "out"), "-q"]
    plain = CliRunner().invoke(main, args)
    stream = CliRunner().invoke(main, [*args, "--stream"])
    assert plain.exit_code == 0 and stream.exit_code == 0, stream.output

    def ids(out):
        return [line.split("#")[1].split()[0] for line in out.splitlines() if "#" in line]

    assert ids(plain.output) == ids(stream.output) and len(ids(plain.output)) == 12


def test_streamed_attribution_reads_a_runs_own_store(tmp_path):
    cfg = dataclasses.replace(
        preset("tiny"), data=DataConfig(name="digits", resolution=8, train_size=20,
                                        val_size=10))
    run = open_run(tmp_path / "run", cfg, progress=False)
    save_unet(build_unet(cfg.model, 1, 8, seed=0), run.paths.model / "unet")
    run.context.features("train", "square")  # the run's own training features
    save_pngs(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1,
              tmp_path / "t")
    args = ["attribute", "--run", str(tmp_path / "run"), str(tmp_path / "t"), "--top", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--device",
            "cpu", "-q"]
    plain = CliRunner().invoke(main, args)
    stream = CliRunner().invoke(main, [*args, "--stream"])
    assert plain.exit_code == 0 and stream.exit_code == 0, stream.output
    assert "run:train[" in stream.output
    assert not list((tmp_path / "cache").glob("*/train"))  # the run's features were read
    assert list((tmp_path / "cache").glob("*/kernel-full/kernel.json"))

    def ids(out):
        return [line.split("#")[1].split()[0] for line in out.splitlines() if "#" in line]

    assert ids(plain.output) == ids(stream.output)
