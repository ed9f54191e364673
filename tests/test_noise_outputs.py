"""Deterministic noise/timesteps/schedule constants, and the output-function registry."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch.func import vmap

from dtrak.noise import (
    ScheduleConstants,
    add_noise,
    alphas_cumprod_linear,
    example_noise,
    timesteps,
)
from dtrak.outputs import OUTPUTS, get_output, register_output

torch.set_num_threads(1)

SCHED = ScheduleConstants.linear()


# --- timesteps ----------------------------------------------------------------------------


def test_uniform_timesteps_are_the_papers():
    assert timesteps("uniform", 10).tolist() == list(range(0, 1000, 100))
    assert timesteps("uniform", 3).tolist() == [0, 333, 666]  # K entries even if T % K != 0
    assert timesteps("uniform", 1000).tolist() == list(range(1000))
    assert timesteps("uniform", 10).dtype == torch.long


def test_cumulative_and_random_timesteps():
    assert timesteps("cumulative", 4).tolist() == [0, 1, 2, 3]
    r = timesteps("random", 50, seed=3)
    assert len(set(r.tolist())) == 50 and r.tolist() == sorted(r.tolist())
    assert torch.equal(r, timesteps("random", 50, seed=3))
    assert not torch.equal(r, timesteps("random", 50, seed=4))


@pytest.mark.parametrize("K", [0, 1001])
def test_timesteps_validate_K(K):
    with pytest.raises(ValueError, match="K"):
        timesteps("uniform", K)


def test_unknown_schedule_lists_known():
    with pytest.raises(ValueError, match="uniform, cumulative, random"):
        timesteps("linear", 10)


# --- noise --------------------------------------------------------------------------------


def test_noise_independent_of_batch_split_order_and_K():
    ids = [5, 0, 17, 3]
    full = example_noise(7, ids, 4, (2, 3, 3))
    assert full.shape == (4, 4, 2, 3, 3)
    split = torch.cat([example_noise(7, ids[:1], 4, (2, 3, 3)),
                       example_noise(7, ids[1:], 4, (2, 3, 3))])
    assert torch.equal(full, split)
    reordered = example_noise(7, torch.tensor([3, 17, 5]), 4, (2, 3, 3))
    assert torch.equal(reordered, full[[3, 2, 0]])
    assert torch.equal(example_noise(7, ids, 2, (2, 3, 3)), full[:, :2])  # same k, smaller K


def test_noise_depends_on_seed_and_id_and_casts_dtype():
    a = example_noise(0, [1, 2], 2, (8,))
    assert not torch.equal(a, example_noise(1, [1, 2], 2, (8,)))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0, 0], a[0, 1])
    assert torch.equal(example_noise(0, [1, 2], 2, (8,), dtype=torch.float64), a.double())
    assert abs(example_noise(0, range(64), 4, (256,)).std().item() - 1) < 0.02


def test_noise_rejects_negative_ids():
    with pytest.raises(ValueError, match=">= 0"):
        example_noise(0, [1, -2], 2, (3,))


# --- schedule -----------------------------------------------------------------------------


def test_schedule_matches_diffusers():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ours = alphas_cumprod_linear()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.allclose(ours, sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    from_sched = ScheduleConstants.from_scheduler(sched)
    assert torch.equal(from_sched.alphas_cumprod, sched.alphas_cumprod.double())
    assert torch.allclose(from_sched.alphas, 1 - sched.betas.double())
    assert from_sched.T == 1000
    with pytest.raises(ValueError, match="alphas_cumprod|betas"):
        ScheduleConstants.from_scheduler(object())


def test_add_noise_broadcasts_over_leading_dims():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 1, 4, 4, generator=gen), torch.randn(2, 3, 1, 4, 4, generator=gen)
    t = torch.tensor([[0, 10, 999], [5, 500, 1]])
    abar = SCHED.alphas_cumprod.numpy()[t.numpy()][..., None, None, None]
    want = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * eps.numpy()
    got = add_noise(x0, eps, t, SCHED.alphas_cumprod)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)  # float32 vs float64


# --- outputs ------------------------------------------------------------------------------


def _numpy_outputs(pred, eps, t):
    """Hand-written reference of SPEC section 4's table, reducing over the last 3 dims."""
    axes = (-3, -2, -1)
    b, a, abar = (SCHED.betas.numpy()[t], SCHED.alphas.numpy()[t], SCHED.alphas_cumprod.numpy()[t])
    mse = ((eps - pred) ** 2).mean(axis=axes)
    return {
        "loss": mse,
        "elbo": b / (2 * a * (1 - abar)) * mse,
        "square": (pred**2).mean(axis=axes),
        "avg": pred.mean(axis=axes),
        "l1": np.abs(pred).sum(axis=axes),
        "l2": np.sqrt((pred**2).sum(axis=axes)),
        "linf": np.abs(pred).max(axis=axes),
    }


@pytest.mark.parametrize("name", ["loss", "elbo", "square", "avg", "l1", "l2", "linf"])
def test_outputs_match_numpy(name):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 2, 4, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 3, 2, 4, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([[0, 1, 999], [100, 500, 900]])
    got = get_output(name)(pred, eps, t, SCHED)
    assert got.shape == (2, 3)
    want = _numpy_outputs(pred.numpy(), eps.numpy(), t.numpy())[name]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_outputs_are_vmap_safe(name):
    gen = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(4, 3, 1, 4, 4, generator=gen), torch.randn(4, 3, 1, 4, 4, generator=gen)
    t = torch.tensor([0, 400, 999])
    fn = get_output(name)
    batched = vmap(lambda p, e: fn(p, e, t, SCHED))(pred, eps)
    assert torch.allclose(batched, fn(pred, eps, t, SCHED), rtol=1e-6)


def test_aliases_and_unknown_names():
    assert get_output("trak") is get_output("loss")
    assert get_output("dtrak") is get_output("square")
    with pytest.raises(ValueError, match="known: .*loss.*square"):
        get_output("mse")


def test_register_output():
    @register_output("_test_max", "max eps_pred (test only)")
    def _max(eps_pred, eps, t, sched):
        return eps_pred.amax(dim=(-3, -2, -1))

    try:
        assert get_output("_test_max").description.startswith("max")
        with pytest.raises(ValueError, match="already registered"):
            register_output("_test_max", "again")(_max)
        with pytest.raises(ValueError, match="already registered"):
            register_output("trak", "alias clash")(_max)
    finally:
        OUTPUTS.pop("_test_max")
