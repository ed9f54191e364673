"""`dtrak attribute` on a user's model and image folder; the farm's job table resume."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from dtrak.cli import main
from dtrak.config import preset, to_dict
from dtrak.families.unet2d import build_unet, save_unet
from dtrak.farm import LocalExecutor, TrainJob, load_jobs, save_jobs
from dtrak.featurize import FeatureSpec
from dtrak.images import save_pngs
from dtrak.stages.attribute import attribute_images
from dtrak.train import train_model


def test_attribute_cli_caches_training_features(tmp_path):
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    save_unet(model, tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "sched")  # the model's noise schedule
    g = torch.Generator().manual_seed(0)
    save_pngs(torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "train")
    save_pngs(torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "targets")
    args = ["attribute", "--model", str(tmp_path / "unet"), "--scheduler", str(tmp_path / "sched"),
            "--data", str(tmp_path / "train"),
            str(tmp_path / "targets"), "--timesteps", "2", "--proj-dim", "32", "--top", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.output.count("top proponents") == 2 and "000000.png" in res.output
    assert "linear betas, T = 1000, epsilon prediction" in res.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    stores = list((tmp_path / "cache").glob("*/train/features.npy"))
    assert len(stores) == 1
    before = stores[0].stat().st_mtime_ns
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0 and stores[0].stat().st_mtime_ns == before  # reused
    assert res.output.splitlines()[:8] == res2.output.splitlines()[:8]
    bad = CliRunner().invoke(main, ["attribute", "--model", str(tmp_path / "train"), "--data",
                                    str(tmp_path / "train"), str(tmp_path / "targets")])
    assert bad.exit_code == 2 and "no diffusers model" in bad.output


def test_attribute_cache_follows_content_not_paths(tmp_path):
    save_unet(build_unet(preset("tiny").model, 1, 8, seed=0), tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "sched")
    g = torch.Generator().manual_seed(0)
    train = tmp_path / "train"
    save_pngs(torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, train)
    save_pngs(torch.rand(1, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "targets")
    spec = FeatureSpec(n_timesteps=2, proj_dim=32)

    def scores(data, cache):
        return attribute_images(tmp_path / "unet", data, [tmp_path / "targets"], spec,
                                cache_dir=cache, progress=False, device="cpu",
                                scheduler=tmp_path / "sched")[0].scores

    cache = tmp_path / "cache"
    before = scores(train, cache)
    store = next(cache.glob("*/train/features.npy"))
    stamp = store.stat().st_mtime_ns
    shutil.copytree(train, tmp_path / "moved")  # same images elsewhere: same key
    for data in (train, tmp_path / "moved"):
        assert np.array_equal(scores(data, cache), before)
    assert len(list(cache.iterdir())) == 1 and store.stat().st_mtime_ns == stamp  # reused
    # replace one training image in place by another of the same byte size and mtime
    victim = train / "000002.png"
    st = victim.stat()
    for seed in range(1, 200):
        new = save_pngs(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
                        * 2 - 1, tmp_path / "swap")[0]
        if new.stat().st_size == st.st_size and new.read_bytes() != victim.read_bytes():
            break
    else:
        pytest.fail("no same-size replacement image found")
    victim.write_bytes(new.read_bytes())
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    after = scores(train, cache)
    assert not np.allclose(after, before)
    assert np.array_equal(after, scores(train, tmp_path / "fresh"))
    assert len(list(cache.iterdir())) == 2


def test_job_table_resumes_without_redoing(tmp_path):
    cfg = preset("tiny")
    images = tmp_path / "images.npy"
    np.save(images, (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
                     * 2 - 1).numpy())
    train = {**to_dict(cfg.train), "steps": 6, "checkpoint_every": 3}
    jobs = [TrainJob(f"j{i}", str(tmp_path / f"j{i}"), str(images), tuple(range(i, 16, 2)),
                     to_dict(cfg.model), train, seed=i) for i in range(2)]
    save_jobs(jobs, tmp_path / "jobs.json")
    assert load_jobs(tmp_path / "jobs.json") == jobs
    LocalExecutor(1, progress=False).run(jobs[:1])  # job 0 finished
    done0 = (tmp_path / "j0" / "done.json").stat().st_mtime_ns
    # job 1 "killed" after its first checkpoint
    data = torch.from_numpy(np.load(images)[list(jobs[1].indices)])
    from dtrak.config import ModelConfig, TrainConfig, section_from_dict

    train_model(data, section_from_dict(ModelConfig, jobs[1].model, "model"),
                section_from_dict(TrainConfig, jobs[1].train, "train"), jobs[1].directory,
                seed=1, stop_at=3, progress=False)
    LocalExecutor(1, progress=False).run(jobs)
    assert (tmp_path / "j0" / "done.json").stat().st_mtime_ns == done0
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "j1" / "stats.jsonl").read_text().splitlines()]
    assert steps == [3, 6]  # resumed at 3, nothing redone
    assert all(j.done for j in jobs)
    # a table with other jobs is refused
    other = [TrainJob("x", "y", str(images), (0,), to_dict(cfg.model), train, seed=0)]
    with pytest.raises(ValueError, match="different jobs"):
        save_jobs(other, tmp_path / "jobs.json")
