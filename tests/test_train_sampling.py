import dataclasses

import numpy as np
import pytest
import torch

from dtrak.config import SamplingConfig, preset
from dtrak.families import get_family
from dtrak.families.unet2d import build_unet, load_unet
from dtrak.train import TrainingDivergedError, is_trained, latest_checkpoint, train_model


@pytest.fixture
def tiny():
    return preset("tiny")


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny):
    import dataclasses

    cfg_train = dataclasses.replace(tiny.train, steps=20, checkpoint_every=5)
    cfg_model = dataclasses.replace(tiny.model, dropout=0.1)  # dropout RNG must resume too
    x = _images()
    train_model(x, cfg_model, cfg_train, tmp_path / "a", progress=False)
    # "kill" after step 12: the last checkpoint is step 10, steps 11-12 are lost
    part = train_model(x, cfg_model, cfg_train, tmp_path / "b", stop_at=12, progress=False)
    assert part.steps == 12 and not (tmp_path / "b" / "done.json").exists()
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000012")
    assert latest_checkpoint(tmp_path / "b").name == "step-0000010"
    train_model(x, cfg_model, cfg_train, tmp_path / "b", progress=False)
    a, b = load_unet(tmp_path / "a" / "unet"), load_unet(tmp_path / "b" / "unet")
    assert torch.equal(_params(a), _params(b))
    # checkpoints are kept (TracIn needs them)
    assert len(list((tmp_path / "a" / "checkpoints").glob("step-*"))) == 4



def test_deleted_final_weights_are_restored_or_retrained(tmp_path, tiny):
    import shutil

    cfg_train = dataclasses.replace(tiny.train, steps=6, checkpoint_every=3)
    x = _images()
    train_model(x, tiny.model, cfg_train, tmp_path / "m", progress=False)
    want = _params(load_unet(tmp_path / "m" / "unet"))
    # the final weights deleted, done.json kept: written again from the last checkpoint
    shutil.rmtree(tmp_path / "m" / "unet")
    train_model(x, tiny.model, cfg_train, tmp_path / "m", progress=False)
    assert torch.equal(_params(load_unet(tmp_path / "m" / "unet")), want)
    # no checkpoint either: trained again (deterministically), never reported finished
    shutil.rmtree(tmp_path / "m" / "unet")
    shutil.rmtree(tmp_path / "m" / "checkpoints")
    res = train_model(x, tiny.model, cfg_train, tmp_path / "m", progress=False)
    assert res.steps == 6 and is_trained(tmp_path / "m")
    assert torch.equal(_params(load_unet(tmp_path / "m" / "unet")), want)

def test_training_subset_and_seed(tmp_path, tiny):
    x = _images()
    r1 = train_model(x, tiny.model, tiny.train, tmp_path / "s1", indices=np.arange(16),
                     seed=1, progress=False)
    train_model(x, tiny.model, tiny.train, tmp_path / "s2", indices=np.arange(16),
                     seed=2, progress=False)
    assert np.isfinite(r1.final_loss)
    a, b = load_unet(tmp_path / "s1" / "unet"), load_unet(tmp_path / "s2" / "unet")
    assert not torch.equal(_params(a), _params(b))
    # a finished model is not retrained
    again = train_model(x, tiny.model, tiny.train, tmp_path / "s1", indices=np.arange(16),
                        seed=1, progress=False)
    assert again.steps == r1.steps


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 1.0)])
def test_sampling_invariant_to_batch(tiny, sampler, eta):
    model = build_unet(tiny.model, 1, 8, seed=0).eval()
    sc = SamplingConfig(n_images=6, steps=4, sampler=sampler, eta=eta, gen_seed=3)
    whole = sample_images(model, tiny.model, sc, range(6))
    parts = [sample_images(model, tiny.model, sc, ids) for ids in ([0, 1], [2, 3, 4], [5])]
    joined = torch.cat([p.images for p in parts])
    # batched convolutions round differently per batch size: equal up to float32 rounding
    torch.testing.assert_close(whole.images, joined, atol=5e-5, rtol=0)
    # image 4 alone, out of order, is the same image
    alone = sample_images(model, tiny.model, sc, [4])
    torch.testing.assert_close(alone.images[0], whole.images[4], atol=5e-5, rtol=0)
    assert whole.trajectory.shape == (6, 4, 1, 8, 8)


def test_same_seed_same_image(tiny):
    model = build_unet(tiny.model, 1, 8, seed=0).eval()
    sc = SamplingConfig(n_images=2, steps=3)
    a = sample_images(model, tiny.model, sc, [0, 1]).images
    b = sample_images(model, tiny.model, sc, [0, 1]).images
    assert torch.equal(a, b)
    other = sample_images(model, tiny.model, SamplingConfig(n_images=2, steps=3, gen_seed=1),
                          [0, 1]).images
    assert not torch.equal(a, other)


def sample_images(model, model_cfg, sc, ids):
    """The unet2d family's sampler, as every stage reaches it."""
    return get_family("unet2d").sample(model, model_cfg, sc, list(ids), sc.save_trajectory)


# ----------------------------------------------------------------- diverged training


def _finite_weights(directory):
    model = load_unet(directory)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nan_loss_keeps_the_last_good_checkpoint_and_is_not_done(tmp_path, tiny):
    cfg = dataclasses.replace(tiny.train, steps=20, checkpoint_every=5)
    x = _images()
    train_model(x, tiny.model, cfg, tmp_path, stop_at=10, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-0000010"
    bad = torch.full_like(x, float("nan"))  # the resumed run meets NaN data at step 11
    with pytest.raises(TrainingDivergedError) as err:
        train_model(bad, tiny.model, cfg, tmp_path, progress=False)
    msg = str(err.value)
    assert "step 11" in msg and str(tmp_path) in msg and "train.lr" in msg
    assert "step-0000010" in msg
    assert not is_trained(tmp_path) and not (tmp_path / "unet").exists()
    assert latest_checkpoint(tmp_path).name == "step-0000010"
    assert _finite_weights(tmp_path / "checkpoints" / "step-0000010" / "unet")


def test_huge_lr_diverges_without_saving_non_finite_weights(tmp_path, tiny):
    cfg = dataclasses.replace(tiny.train, steps=20, checkpoint_every=1, lr=1e3, warmup_frac=0.0)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step \d+"):
        train_model(_images(), tiny.model, cfg, tmp_path, progress=False)
    assert not is_trained(tmp_path) and not (tmp_path / "unet").exists()
    for ckpt in (tmp_path / "checkpoints").glob("step-*"):
        assert _finite_weights(ckpt / "unet"), ckpt
