"""Diverged training (NaN/inf loss or weights) stops with a clear error and is never done."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtrak.config import preset
from dtrak.families.unet2d import load_unet
from dtrak.train import TrainingDivergedError, is_trained, latest_checkpoint, train_model


@pytest.fixture
def tiny():
    return preset("tiny")


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


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
