"""Bring your own model: diffusers pipeline folders, their own noise schedules, conditional
models, v / x0 prediction, dtrak runs given with --run."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dtrak.cli import main
from dtrak.config import ConfigError, DataConfig, apply_overrides, preset
from dtrak.data import load_image_folder
from dtrak.families import get_family
from dtrak.families.base import load_scheduler
from dtrak.families.unet2d import (
    LabelledImages,
    UNet2DAdapter,
    build_unet,
    save_unet,
    unet_kwargs,
)
from dtrak.featurize import FeatureSpec, featurize_into
from dtrak.gradients import per_sample_gradients
from dtrak.images import save_pngs
from dtrak.noise import ScheduleConstants
from dtrak.paths import RunPaths
from dtrak.scoring import KernelSolver
from dtrak.stages.attribute import attribute_images, resolve_model
from dtrak.stages.check import check_config
from dtrak.stages.run import open_run
from dtrak.train import train_model

COSINE = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")


def _unet(**extra) -> UNet2DModel:
    kwargs = {**unet_kwargs(preset("tiny").model, 1, 8), **extra}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(**kwargs).eval()


def _images(folder, n, seed):
    g = torch.Generator().manual_seed(seed)
    return save_pngs(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, folder)


def _cli(*args):
    return CliRunner().invoke(main, ["attribute", *map(str, args), "-q"])


def test_pipeline_folder_gets_its_own_schedule(tmp_path):
    unet = _unet()
    scheduler = DDPMScheduler(**COSINE)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    _images(tmp_path / "train", 6, 0)
    _images(tmp_path / "targets", 1, 1)
    res = _cli("--model", tmp_path / "pipe", "--data", tmp_path / "train", tmp_path / "targets",
               "--timesteps", 3, "--proj-dim", 16, "--top", 2, "--cache", tmp_path / "cache",
               "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "squaredcos_cap_v2 betas, T = 500, epsilon prediction" in res.output
    cached = np.load(next((tmp_path / "cache").glob("*/train/features.npy")))
    spec = FeatureSpec(output="square", n_timesteps=3, proj_dim=16)
    train = load_image_folder(tmp_path / "train")[0]

    def direct(sched, name):
        return featurize_into(UNet2DAdapter(unet), train, tmp_path / name, spec, sched,
                              "attribute", "train", progress=False).load()

    cosine = direct(ScheduleConstants.from_scheduler(scheduler), "cosine")
    assert np.allclose(cached, cosine, rtol=1e-5, atol=1e-7)
    linear = direct(ScheduleConstants.linear(), "linear")
    assert not np.allclose(cached, linear, rtol=1e-2, atol=1e-4)
    meta = json.loads(next((tmp_path / "cache").glob("*/train/meta.json")).read_text())
    assert meta["timesteps"] == [0, 166, 332]  # uniform over the model's T = 500


class _Reparameterised(torch.nn.Module):
    """An epsilon model seen as a v- or x0-prediction model (what such a model would output)."""

    def __init__(self, unet, kind, abar):
        super().__init__()
        self.unet, self.kind = unet, kind
        self.register_buffer("abar", abar.float())

    def forward(self, x_t, t, return_dict=True, **cond):
        eps = self.unet(x_t, t, **cond).sample
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        x0 = (x_t - s * eps) / a
        out = a * eps - s * x0 if self.kind == "v_prediction" else x0
        return (out,) if not return_dict else SimpleNamespace(sample=out)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_v_and_x0_models_are_attributed_through_their_epsilon(kind):
    unet = _unet()
    sched = ScheduleConstants.from_scheduler(DDPMScheduler(**COSINE))
    wrapped = _Reparameterised(unet, kind, sched.alphas_cumprod).eval()
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ts = torch.tensor([10, 250, 480])
    args = (x0, [0, 1], "square", ts, sched, 3)
    want = per_sample_gradients(UNet2DAdapter(unet), *args)
    got = per_sample_gradients(UNet2DAdapter(wrapped, kind, sched), *args)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-5)
    # without the conversion the features are those of another output
    raw = per_sample_gradients(UNet2DAdapter(wrapped), *args)
    assert not torch.allclose(raw, want, rtol=1e-2, atol=1e-4)
    with pytest.raises(ValueError, match="unknown prediction type 'flow'"):
        UNet2DAdapter(unet, "flow", sched)
    with pytest.raises(ValueError, match="needs its noise schedule"):
        UNet2DAdapter(unet, kind)


def test_prediction_type_is_read_from_the_scheduler_and_training_stays_epsilon(tmp_path):
    DDPMPipeline(unet=_unet(), scheduler=DDPMScheduler(prediction_type="v_prediction",
                                                       **COSINE)).save_pretrained(tmp_path / "p")
    source = resolve_model(tmp_path / "p")
    assert source.prediction_type == "v_prediction" and source.model_dir == tmp_path / "p/unet"
    cfg = apply_overrides(preset("tiny"), ["model.prediction_type='v_prediction'"])
    with pytest.raises(ConfigError, match="trains epsilon-prediction models only"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="trains epsilon-prediction models only"):
        train_model(torch.zeros(4, 1, 8, 8), cfg.model, cfg.train, tmp_path / "m",
                    progress=False)
    with pytest.raises(ConfigError, match="model.beta_schedule"):
        apply_overrides(preset("tiny"), ["model.beta_schedule='sigmoid'"])
    cos = apply_overrides(preset("tiny"), ["model.beta_schedule='squaredcos_cap_v2'",
                                           "model.num_train_timesteps=500"])
    from_cfg = ScheduleConstants.from_scheduler(get_family("unet2d").scheduler(cos.model))
    assert torch.equal(from_cfg.betas, ScheduleConstants.from_scheduler(
        DDPMScheduler(**COSINE)).betas)


def test_a_bare_model_folder_needs_its_schedule(tmp_path):
    save_unet(_unet(), tmp_path / "unet")
    _images(tmp_path / "train", 4, 0)
    _images(tmp_path / "t", 1, 1)
    res = _cli("--model", tmp_path / "unet", "--data", tmp_path / "train", tmp_path / "t")
    assert res.exit_code == 2
    assert "--scheduler DIR" in res.output and "model_index.json" in res.output
    DDPMScheduler(**COSINE).save_pretrained(tmp_path / "sched")
    source = resolve_model(tmp_path / "unet", scheduler=tmp_path / "sched")
    assert source.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert load_scheduler(tmp_path / "sched").config.num_train_timesteps == 500
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        resolve_model(tmp_path / "unet", scheduler=tmp_path / "train")
    # a dtrak run's own model folder: the run's config says its schedule
    run = tmp_path / "run"
    cfg = apply_overrides(preset("tiny"), ["model.num_train_timesteps=300"])
    open_run(run, cfg)
    save_unet(_unet(), RunPaths(run).model / "unet")
    source = resolve_model(RunPaths(run).model / "unet")
    assert source.run == run.resolve() and source.scheduler.config.num_train_timesteps == 300


def test_class_conditional_model_attributes_with_its_labels(tmp_path):
    unet = _unet(num_class_embeds=2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**COSINE)).save_pretrained(tmp_path / "p")
    _images(tmp_path / "train" / "cat", 3, 0)
    _images(tmp_path / "train" / "dog", 3, 1)
    _images(tmp_path / "targets" / "cat", 1, 5)
    spec = FeatureSpec(output="square", n_timesteps=2, proj_dim=16)

    def attribute(data, images, **kw):
        return attribute_images(tmp_path / "p", data, images, spec, progress=False,
                                cache_dir=tmp_path / "cache", device="cpu", **kw)[0]

    cat = attribute(tmp_path / "train", [tmp_path / "targets"])
    assert cat.target_class == "cat" and len(cat.scores) == 6
    # the cached training features are those of the folder labels (cat 0, dog 1) ...
    cached = np.load(next((tmp_path / "cache").glob("*/train/features.npy")))
    train = load_image_folder(tmp_path / "train")[0]
    target = load_image_folder(tmp_path / "targets")[0]
    sched = ScheduleConstants.from_scheduler(DDPMScheduler(**COSINE))

    def features(images, labels, name, set_name):
        return featurize_into(UNet2DAdapter(unet), LabelledImages(images, labels),
                              tmp_path / name, spec, sched, "attribute", set_name,
                              progress=False).load()

    assert np.allclose(cached, features(train, [0, 0, 0, 1, 1, 1], "true", "train"),
                       rtol=1e-5, atol=1e-7)
    # ... and permuted labels give other features and other scores
    permuted = features(train, [1, 1, 1, 0, 0, 0], "permuted", "train")
    assert not np.allclose(cached, permuted, rtol=1e-2, atol=1e-4)
    phi_t = features(target, [0], "target", "targets")
    lam = cat.lam_rel
    true_scores = KernelSolver(cached).scores(phi_t, lam * KernelSolver(cached).trace_scale)
    perm_scores = KernelSolver(permuted).scores(phi_t, lam * KernelSolver(permuted).trace_scale)
    assert np.allclose(cat.scores, true_scores[0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(cat.scores, perm_scores[0], rtol=1e-2, atol=1e-4)
    dog = attribute(tmp_path / "train", [tmp_path / "targets"], target_class="dog")
    assert dog.target_class == "dog" and not np.allclose(dog.scores, cat.scores, rtol=1e-2)
    loose = tmp_path / "loose"
    _images(loose, 2, 0)
    with pytest.raises(ValueError, match="class folders"):
        attribute(loose, [tmp_path / "targets"])
    with pytest.raises(ValueError, match="--target-class NAME"):
        attribute(tmp_path / "train", [loose])
    with pytest.raises(ValueError, match="none of the training classes"):
        attribute(tmp_path / "train", [loose], target_class="bird")


def test_run_directory_gives_model_schedule_data_lambda_and_features(tmp_path):
    cfg = dataclasses.replace(
        preset("tiny"), data=DataConfig(name="digits", resolution=8, train_size=20,
                                        val_size=10))
    run = open_run(tmp_path / "run", cfg, progress=False)
    save_unet(build_unet(cfg.model, 1, 8, seed=0), run.paths.model / "unet")
    run.context.features("train", "square")  # the run's own training features
    run.paths.results.mkdir(parents=True)
    (run.paths.results / "lds.json").write_text(json.dumps({"records": [
        {"method": "dtrak", "targets": "val", "lambda": 5.0, "lambda_rel": 0.25,
         "lambda_selection": "heldout"}]}))
    _images(tmp_path / "t", 1, 1)
    res = _cli("--run", tmp_path / "run", tmp_path / "t", "--top", 2, "--cache",
               tmp_path / "cache", "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "(run): linear betas, T = 1000" in res.output
    assert "20 training images; lambda = 0.25 x trace/N (the LDS of" in res.output
    assert "run:train[" in res.output
    assert not list((tmp_path / "cache").glob("*/train"))  # the run's features were reused
    both = _cli("--run", tmp_path / "run", "--model", tmp_path / "run/model/unet", tmp_path / "t")
    assert both.exit_code == 2 and "not both" in both.output
