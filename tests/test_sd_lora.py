"""The sd-lora family on tiny random Stable Diffusion components built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from PIL import Image

from dtrak.cli import main
from dtrak.config import ConfigError, ModelConfig, SamplingConfig, TrainConfig
from dtrak.data import load_image_folder
from dtrak.families import CaptionedImages, get_family
from dtrak.families.sd_components import tiny_unet, tiny_vae, write_pipeline
from dtrak.families.sd_lora import LORA_FILE, load_lora
from dtrak.gradients import per_sample_gradients, reference_gradients
from dtrak.noise import ScheduleConstants
from dtrak.train import train_model

# Stable Diffusion 1.x's UNet config (CompVis/stable-diffusion-v1-4 unet/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder (unet, vae, text encoder, tokenizer, scheduler)."""
    return write_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd", unet=tiny_unet(),
                          vae=tiny_vae())


def _cfg(sd_dir: Path, **changes) -> ModelConfig:
    return ModelConfig(family="sd-lora", pretrained=str(sd_dir), lora_rank=4, dropout=0.0,
                       **changes)


def _examples(n: int = 6) -> CaptionedImages:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return CaptionedImages(images, tuple(("a photo of a cat", "a photo of a dog")[i % 2]
                                         for i in range(n)))


def test_sd15_lora_parameter_count():
    """The paper's LoRA (rank 128 on to_q, to_k, to_v, to_out.0) has 25,509,888 parameters."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        unet.add_adapter(LoraConfig(r=128, lora_alpha=128, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    n = sum(p.numel() for name, p in unet.named_parameters() if ".lora_" in name)
    assert n == 25_509_888


def test_build_save_load_roundtrip(sd_dir, tmp_path):
    fam = get_family("sd-lora")
    model = fam.build(_cfg(sd_dir), (3, 16, 16), seed=1)
    names = fam.adapter(model).attributed_parameters()
    assert names and all(".lora_" in n for n in names)
    trainable = fam.trainable_parameters(model)
    assert sum(p.numel() for p in trainable) == sum(
        p.numel() for n, p in model.unet.named_parameters() if ".lora_" in n)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    fam.save(model, tmp_path / "lora")
    assert (tmp_path / "lora" / LORA_FILE).is_file()
    back = fam.load(tmp_path / "lora")
    for (n, a), (_, b) in zip(model.unet.state_dict().items(), back.unet.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(a, b, msg=n)
    # the same seed builds the same adapter; another seed another one
    again = fam.build(_cfg(sd_dir), (3, 16, 16), seed=1)
    other = fam.build(_cfg(sd_dir), (3, 16, 16), seed=2)
    a_name = next(n for n in names if "lora_A" in n)
    sd = dict(model.unet.named_parameters())
    assert torch.equal(dict(again.unet.named_parameters())[a_name], sd[a_name])
    assert not torch.equal(dict(other.unet.named_parameters())[a_name], sd[a_name])


def test_bad_inputs_have_clear_errors(sd_dir, tmp_path):
    fam = get_family("sd-lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/"):
        fam.build(ModelConfig(family="sd-lora", pretrained=str(tmp_path / "empty"),
                              lora_rank=4), (3, 16, 16))
    with pytest.raises(ConfigError, match="model.pretrained"):
        fam.build(ModelConfig(family="sd-lora", pretrained=None, lora_rank=4), (3, 16, 16))
    with pytest.raises(FileNotFoundError, match=LORA_FILE):
        load_lora(sd_dir, tmp_path / "empty")
    # a LoRA made for another UNet does not fit
    other = write_pipeline(tmp_path / "other", unet=tiny_unet(cross_attention_dim=16),
                           vae=tiny_vae())
    model = fam.build(_cfg(other), (3, 16, 16), seed=0)
    fam.save(model, tmp_path / "other-lora")
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(sd_dir, tmp_path / "other-lora")
    adapter = fam.adapter(fam.build(_cfg(sd_dir), (3, 16, 16), seed=0))
    with pytest.raises(ValueError, match="caption"):
        adapter.prepare(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="one caption per image"):
        CaptionedImages(torch.zeros(2, 3, 16, 16), ("a",))


def test_lora_gradients_match_per_example_backward_float64(sd_dir):
    """vmap per-sample LoRA gradients == a per-example autograd loop, in float64."""
    fam = get_family("sd-lora")
    model = fam.build(_cfg(sd_dir), (3, 16, 16), seed=0).double()
    with torch.no_grad():  # peft starts B at zero (a zero gradient for A): make it random
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    adapter = fam.adapter(model)
    x0, cond = adapter.prepare(_examples(3)[torch.arange(3)])
    assert x0.shape == (3, 4, 8, 8) and cond["encoder_hidden_states"].shape == (3, 77, 32)
    sched = ScheduleConstants.from_scheduler(fam.scheduler(_cfg(sd_dir)))
    ts = torch.tensor([10, 500, 990])
    ids = torch.arange(3)
    p = sum(t.numel() for n, t in model.unet.named_parameters() if ".lora_" in n)
    for output in ("loss", "square"):
        fast = per_sample_gradients(adapter, x0, ids, output, ts, sched, 3, cond=cond)
        ref = reference_gradients(adapter, x0, ids, output, ts, sched, 3, cond=cond,
                                  dtype=torch.float64)
        assert fast.shape == (3, p)
        torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-12)
        assert fast.abs().sum() > 0


def test_train_lora_resumes_and_samples(sd_dir, tmp_path):
    fam = get_family("sd-lora")
    cfg = _cfg(sd_dir)
    tc = TrainConfig(steps=4, batch_size=3, lr=1e-3, checkpoint_every=2, hflip=True)
    data = _examples(6)
    full = train_model(data, cfg, tc, tmp_path / "a", progress=False)
    train_model(data, cfg, tc, tmp_path / "b", progress=False, stop_at=2)
    again = train_model(data, cfg, tc, tmp_path / "b", progress=False)
    assert full.steps == again.steps == 4 and np.isfinite(full.final_loss)
    ma, mb = fam.load(tmp_path / "a" / "unet"), fam.load(tmp_path / "b" / "unet")
    for (n, a), (_, b) in zip(ma.unet.named_parameters(), mb.unet.named_parameters(),
                              strict=True):
        torch.testing.assert_close(a, b, msg=n)  # a killed run ends where an uninterrupted one
    sc = SamplingConfig(n_images=2, steps=3, batch_size=2, guidance_scale=7.5)
    out = fam.sample(ma, cfg, sc, [0, 1], True, prompts=["a photo of a cat", "a photo of a dog"])
    assert out.images.shape == (2, 3, 16, 16) and out.trajectory.shape == (2, 3, 3, 16, 16)
    assert out.images.abs().max() <= 1
    one = fam.sample(ma, cfg, sc, [1], False, prompts=["a photo of a dog"])
    torch.testing.assert_close(one.images[0], out.images[1], rtol=1e-4, atol=1e-5)


def test_whole_unet_from_preset_in_pixel_space(tmp_path):
    """lora_rank = 0 without a unet/: the UNet is built from the preset (no VAE: pixels);
    the saved model is a pipeline folder that a LoRA run loads as its base."""
    base = write_pipeline(tmp_path / "text-only")
    fam = get_family("sd-lora")
    cfg = ModelConfig(family="sd-lora", pretrained=str(base), lora_rank=0, preset="tiny",
                      dropout=0.0)
    data = CaptionedImages(torch.rand(4, 3, 8, 8) * 2 - 1, ("a photo of a cat",) * 4)
    res = train_model(data, cfg, TrainConfig(steps=2, batch_size=2, checkpoint_every=2),
                      tmp_path / "base", progress=False)
    assert res.steps == 2
    saved = tmp_path / "base" / "unet"
    assert json.loads((saved / "model_index.json").read_text())["vae"] == [None, None]
    model = fam.load(saved)
    assert model.vae is None and fam.adapter(model).attributed_parameters() is None
    lora = fam.build(ModelConfig(family="sd-lora", pretrained=str(saved), lora_rank=2),
                     (3, 8, 8), seed=0)
    assert fam.adapter(lora).attributed_parameters()
    x0, cond = fam.adapter(lora).prepare(data)
    assert x0.shape == (4, 3, 8, 8) and cond["encoder_hidden_states"].shape[0] == 4


def _image_folder(root: Path, per_class: int = 8) -> Path:
    """Class folders of random 16x16 RGB PNGs (post_impressionism, ukiyo_e)."""
    rng = np.random.default_rng(0)
    for c in ("post_impressionism", "ukiyo_e"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / c / f"{i:03d}.png")
    return root


TINY_SD_TOML = """
name = "tiny-sd"
stages = ["data", "train", "generate", "featurize", "score", "lds", "report"]
[data]
name = "artbench"
resolution = 16
train_size = 12
val_size = 4
[model]
family = "sd-lora"
lora_rank = 4
caption_template = "a {{class}} painting"
pretrained = "{sd}"
dropout = 0.0
[train]
steps = 6
batch_size = 4
checkpoint_every = 3
lr = 1e-3
[sampling]
n_images = 4
steps = 3
batch_size = 2
save_trajectory = false
[attribution]
outputs = ["loss", "square"]
n_timesteps = 2
proj_dim = 32
batch_size = 4
methods = ["trak", "dtrak", "kernel-avg", "random", "grad-cos", "das", "ekfac-if"]
[das]
residual_timesteps = 5
[influence]
factor_draws = 2
train_draws = 2
target_draws = 2
[lds]
n_subsets = 3
seeds = [0]
eval_timesteps = 3
noise_seeds = [0]
n_boot = 20
[runtime]
threads = 1
"""


def test_tiny_sd_lora_run_end_to_end(sd_dir, tmp_path):
    """`dtrak run` on a Stable Diffusion folder: data, LoRA training, generation from class
    prompts, features, scores, LDS (LoRA subset models) and the report, then a rerun that
    finds everything done."""
    data = _image_folder(tmp_path / "art")
    config = tmp_path / "tiny-sd.toml"
    config.write_text(TINY_SD_TOML.format(sd=sd_dir))
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(config), "--out", str(out), "--set",
                               f"data.root='{data}'", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (out / "model" / "unet" / LORA_FILE).is_file()
    prompts = json.loads((out / "gen" / "prompts.json").read_text())
    assert prompts == ["a post impressionism painting", "a ukiyo e painting"] * 2
    lds = json.loads((out / "results" / "lds.json").read_text())
    methods = {r["method"] for r in lds["records"]}
    assert {"trak", "dtrak", "kernel-avg", "random", "grad-cos", "das", "ekfac-if"} <= methods
    # DAS and the influence method see the LoRA parameters only (K-FAC: the LoRA Linears)
    meta = json.loads(next((out / "features" / "full" / "train").glob("influence-*/meta.json"))
                      .read_text())
    assert meta["modules"] and all("lora_" in name for name in meta["modules"])
    assert all(np.isfinite(r["lds"]) for r in lds["records"])
    assert (out / "report" / "index.html").is_file()
    assert len(list((out / "lds" / "models").glob("m*/unet/" + LORA_FILE))) == 3
    again = runner.invoke(main, ["run", str(config), "--out", str(out), "--set",
                                 f"data.root='{data}'", "--quiet"])
    assert again.exit_code == 0, again.output + repr(again.exception)


def test_attribute_own_lora_from_cli(sd_dir, tmp_path):
    """`dtrak attribute --model SD --lora LORA --data IMAGES --prompt P IMG`: captions from a
    metadata.jsonl, or from class folders with --caption-template; a missing one is named."""
    fam = get_family("sd-lora")
    data = _image_folder(tmp_path / "art", per_class=3)
    examples = CaptionedImages(load_images(data), ("a cat",) * 6)
    train_model(examples, _cfg(sd_dir), TrainConfig(steps=2, batch_size=3, checkpoint_every=2),
                tmp_path / "lora-run", progress=False)
    lora = tmp_path / "lora-run" / "unet"
    assert fam.load(lora).lora["rank"] == 4
    target = data / "ukiyo_e" / "001.png"
    args = ["attribute", str(target), "--model", str(sd_dir), "--lora", str(lora), "--data",
            str(data), "--prompt", "a ukiyo e painting", "--timesteps", "2", "--proj-dim",
            "16", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "gallery"),
            "--quiet", "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "has no caption" in res.output, res.output
    res = CliRunner().invoke(main, [*args, "--caption-template", "a {class} painting"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "top proponents" in res.output and "LoRA" in res.output
    lines = [json.dumps({"file_name": p.name, "text": f"a painting {i}"})
             for i, p in enumerate(sorted((data / "ukiyo_e").glob("*.png")))]
    (data / "ukiyo_e" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, args)  # ukiyo_e from metadata, post_impressionism: none
    assert res.exit_code != 0 and "post_impressionism" in res.output, res.output


def load_images(folder: Path) -> torch.Tensor:
    return load_image_folder(folder, resolution=16, channels=3)[0]
