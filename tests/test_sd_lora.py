"""The sd-lora family on tiny random Stable Diffusion components built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image

from dtrak.artefacts import DamagedArtefactError, digest
from dtrak.cli import main
from dtrak.config import ConfigError, ModelConfig, SamplingConfig, TrainConfig
from dtrak.data import load_image_folder
from dtrak.families import CaptionedImages, EncodedExamples, get_family
from dtrak.families.sd_components import tiny_unet, tiny_vae, write_pipeline
from dtrak.families.sd_lora import LORA_FILE, TextToImage, load_lora
from dtrak.featurize import FeatureSpec, featurize_into
from dtrak.gradients import per_sample_gradients, reference_gradients
from dtrak.hooks import hook_gradients
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
        # the hook engine (one batched backward, text conditioning repeated per timestep)
        hooked = hook_gradients(adapter, x0, ids, [output], ts, sched, 3, cond=cond)[0]
        torch.testing.assert_close(hooked, ref, rtol=1e-8, atol=1e-12)


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
methods = ["trak", "dtrak", "kernel-avg", "random", "grad-cos", "pixel-cos", "das", "ekfac-if"]
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
    assert {"trak", "dtrak", "kernel-avg", "random", "grad-cos", "pixel-cos", "das",
            "ekfac-if"} <= methods
    # DAS and the influence method see the LoRA parameters only (K-FAC: the LoRA Linears)
    meta = json.loads(next((out / "features" / "full" / "train").glob("influence-*/meta.json"))
                      .read_text())
    assert meta["modules"] and all("lora_" in name for name in meta["modules"])
    assert all(np.isfinite(r["lds"]) for r in lds["records"])
    assert (out / "gen" / "prompts.png").is_file()  # the samples, one row per prompt
    assert "gen-prompts.png" in (out / "report" / "index.html").read_text()
    assert len(list((out / "lds" / "models").glob("m*/unet/" + LORA_FILE))) == 3
    # every set encoded once, in RUN/cache; the subset models read the training set's cache
    for name in ("train", "val", "gen"):
        assert (out / "cache" / name / "latents.npy").is_file()
    assert (out / "cache" / "train" / "flipped.npy").is_file()  # train.hflip (default)
    pointer = json.loads((out / "data" / "train_images.cache.json").read_text())
    assert (out / "data" / pointer["directory"]).resolve() == (out / "cache" / "train").resolve()
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


def _no_encoding(monkeypatch) -> None:
    """Make the VAE and the text encoder refuse to run."""
    def refuse(*args, **kwargs):
        raise AssertionError("encoded again")
    monkeypatch.setattr(TextToImage, "encode_text", refuse)
    monkeypatch.setattr(AutoencoderKL, "encode", refuse)


def test_encoding_cache_written_once_reused_and_checked(sd_dir, tmp_path, monkeypatch,
                                                        caplog):
    fam, cfg = get_family("sd-lora"), _cfg(sd_dir)
    data, cache = _examples(5), tmp_path / "cache"
    enc = fam.cached_examples(data, cfg, cache, flips=True)
    assert isinstance(enc, EncodedExamples) and enc.shape == data.shape and len(enc) == 5
    files = {p.name for p in cache.iterdir()}
    assert {"latents.npy", "latent_std.npy", "flipped.npy", "flipped_std.npy",
            "embeddings.npy", "caption_index.npy", "meta.json"} <= files
    assert enc.embeddings.shape[0] == 3  # two captions and the empty one
    # the cached set has the digest of the captioned images it holds
    assert digest(enc) == digest(data)
    with monkeypatch.context() as m:  # read again: nothing is encoded
        _no_encoding(m)
        again = fam.cached_examples(data, cfg, cache, flips=True)
        torch.testing.assert_close(again.latents, enc.latents, rtol=0, atol=0)
        # the adapter takes encoded examples without its encoders
        model = fam.build(cfg, (3, 16, 16), seed=0)
        x0, cond = fam.adapter(model).prepare(again)
        assert x0.shape == (5, 4, 8, 8) and cond["encoder_hidden_states"].shape == (5, 77, 32)
    x_raw, c_raw = fam.adapter(model).prepare(data)
    torch.testing.assert_close(x0, x_raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["encoder_hidden_states"], c_raw["encoder_hidden_states"])
    # a killed encoding resumes: only the missing file is computed
    (cache / "flipped_std.npy").unlink()
    with monkeypatch.context() as m:
        m.setattr(TextToImage, "encode_text", lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("text encoded again")))
        resumed = fam.cached_examples(data, cfg, cache, flips=True)
    torch.testing.assert_close(resumed.flipped_std, enc.flipped_std)
    # stale (other captions): encoded again, with a warning
    other = CaptionedImages(data.images, ("a photo of a bird",) * 5)
    with caplog.at_level("WARNING"):
        fresh = fam.cached_examples(other, cfg, cache)
    assert "stale" in caplog.text and fresh.embeddings.shape[0] == 2
    # damaged: refused, naming the file to delete
    path = cache / "latents.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DamagedArtefactError, match="latents.npy.*delete"):
        fam.cached_examples(other, cfg, cache)
    (cache / "meta.json").write_text("{not json")
    with pytest.raises(DamagedArtefactError, match="meta.json"):
        fam.cached_examples(other, cfg, cache)


def test_cached_training_and_features_equal_uncached(sd_dir, tmp_path, monkeypatch):
    """Training on cached encodings (flips and caption dropout included) ends with the
    weights of training on the images; features are the same with and without the cache."""
    fam, cfg = get_family("sd-lora"), _cfg(sd_dir, caption_dropout=0.5)
    tc = TrainConfig(steps=4, batch_size=3, lr=1e-3, checkpoint_every=4, hflip=True)
    data = _examples(6)
    enc = fam.cached_examples(data, cfg, tmp_path / "cache", flips=True)
    ra = train_model(data, cfg, tc, tmp_path / "raw", progress=False, indices=np.arange(1, 6))
    with monkeypatch.context() as m:
        _no_encoding(m)
        rb = train_model(enc, cfg, tc, tmp_path / "cached", progress=False,
                         indices=np.arange(1, 6))
    assert ra.final_loss == pytest.approx(rb.final_loss, rel=1e-5)
    ma, mb = fam.load(tmp_path / "raw" / "unet"), fam.load(tmp_path / "cached" / "unet")
    init = fam.build(cfg, (3, 16, 16), seed=tc.seed)
    names = [n for n, _ in ma.unet.named_parameters() if ".lora_" in n]
    pa, pb, p0 = (m.unet.state_dict() for m in (ma, mb, init))
    moved = max(float((pa[n] - p0[n]).abs().max()) for n in names)
    apart = max(float((pa[n] - pb[n]).abs().max()) for n in names)
    # AdamW turns float rounding of near-zero gradients into steps of up to lr: the two runs
    # agree far below what training moved the weights
    assert moved > 2e-3 and apart < 0.05 * moved, (moved, apart)
    adapter = fam.adapter(ma)
    sched = ScheduleConstants.from_scheduler(fam.scheduler(cfg))
    spec = FeatureSpec(output="loss", n_timesteps=2, proj_dim=16)
    raw = featurize_into(adapter, data, tmp_path / "f-raw", spec, sched, "full", "train",
                         batch_size=4, progress=False).load()
    with monkeypatch.context() as m:
        _no_encoding(m)
        cached = featurize_into(adapter, enc, tmp_path / "f-cached", spec, sched, "full",
                                "train", batch_size=4, progress=False).load()
    np.testing.assert_allclose(cached, raw, rtol=1e-4, atol=1e-5)


RUN_TOML = """
stages = ["data", "train", "featurize"]
[data]
name = "imagefolder"
resolution = 16
train_size = 4
val_size = 2
[model]
family = "sd-lora"
lora_rank = 2
caption_template = "a {{class}} painting"
pretrained = "{sd}"
dropout = 0.0
[train]
steps = 2
batch_size = 2
checkpoint_every = 2
[attribution]
outputs = ["loss"]
n_timesteps = 1
proj_dim = 8
batch_size = 4
methods = ["trak"]
targets = ["val"]
[runtime]
threads = 1
"""


def test_run_takes_captions_from_metadata_jsonl(sd_dir, tmp_path):
    """`dtrak run` on an image folder with a metadata.jsonl: each image is captioned from it
    (training and validation); an image it lacks is refused, naming it and the file."""
    data = _image_folder(tmp_path / "art", per_class=3)
    files = sorted(data.rglob("*.png"))
    texts = {p.relative_to(data).as_posix(): f"painting number {i}" for i, p in enumerate(files)}
    lines = [json.dumps({"file_name": k, "text": v}) for k, v in texts.items()]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "run.toml"
    config.write_text(RUN_TOML.format(sd=sd_dir))
    args = ["run", str(config), "--out", str(tmp_path / "run"), "--set",
            f"data.root='{data}'", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    for name, size in (("train", 4), ("val", 2)):
        meta = json.loads((tmp_path / "run" / "cache" / name / "meta.json").read_text())
        used = [c for c in meta["captions"] if c]
        assert len(used) == size and set(used) <= set(texts.values()), used
    assert (tmp_path / "run" / "features" / "full" / "val").is_dir()
    # one image without a caption: refused, naming the image and the metadata file
    (data / "metadata.jsonl").write_text("\n".join(lines[1:]) + "\n")
    res = CliRunner().invoke(main, [*args[:3], str(tmp_path / "run2"), *args[4:]])
    missing = files[0].name
    assert res.exit_code != 0
    assert missing in res.output and "metadata.jsonl" in res.output, res.output
