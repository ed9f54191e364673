"""Vectorised per-sample gradients against the plain per-example backward loop (oracle)."""

import copy
import warnings

import pytest
import torch
from diffusers import UNet2DModel

from dtrak.families import UNet2DAdapter
from dtrak.gradients import (
    check_finite,
    output_values,
    param_order,
    per_sample_gradients,
    per_sample_gradients_multi,
    reference_gradients,
)
from dtrak.noise import ScheduleConstants, example_noise, timesteps

torch.set_num_threads(1)

SCHED = ScheduleConstants.linear()
TS = timesteps("uniform", 3)
IDS = [4, 0, 9]


def tiny_unet(**extra) -> UNet2DModel:
    """A 45K-parameter UNet with one attention level (down and up)."""
    with torch.random.fork_rng(devices=[]):  # initialisers use the global generator
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=8, **extra,
        ).eval()


@pytest.fixture(scope="module")
def unet32():
    return tiny_unet()


@pytest.fixture(scope="module")
def unet64(unet32):
    return copy.deepcopy(unet32).double()


@pytest.fixture(scope="module")
def x0():
    return torch.rand(len(IDS), 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("output", ["loss", "elbo", "square", "avg", "l1", "l2", "linf"])
def test_oracle_float64(unet64, x0, output):
    a = UNet2DAdapter(unet64)
    fast = per_sample_gradients(a, x0, IDS, output, TS, SCHED, noise_seed=3)
    ref = reference_gradients(a, x0, IDS, output, TS, SCHED, noise_seed=3)
    assert fast.dtype == torch.float64
    assert fast.shape == (3, sum(p.numel() for p in unet64.parameters()))
    assert ref.abs().max() > 0
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-12)


def test_multi_output_gradients_equal_the_reference_per_output(unet64, x0):
    """One forward pass for all seven output functions (the ablation's fast path)."""
    a = UNet2DAdapter(unet64)
    outs = ["loss", "elbo", "square", "avg", "l1", "l2", "linf"]
    multi = per_sample_gradients_multi(a, x0, IDS, outs, TS, SCHED, noise_seed=3)
    assert multi.shape == (7, 3, sum(p.numel() for p in unet64.parameters()))
    for j, o in enumerate(outs):
        ref = reference_gradients(a, x0, IDS, o, TS, SCHED, noise_seed=3)
        torch.testing.assert_close(multi[j], ref, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="at least one output"):
        per_sample_gradients_multi(a, x0, IDS, [], TS, SCHED, noise_seed=3)


def test_float32_vectorised_path_matches_sdpa_reference_without_fallback(unet32, x0):
    """MATH attention under vmap: no batching-rule fallback, equal to the default SDPA path."""
    a = UNet2DAdapter(unet32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, noise_seed=0)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    ref = reference_gradients(a, x0, IDS, "square", TS, SCHED, noise_seed=0, dtype=torch.float64)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-6)


def test_reference_dtype_option_equals_double_model(unet32, unet64, x0):
    a32, a64 = UNet2DAdapter(unet32), UNet2DAdapter(unet64)
    cast = reference_gradients(a32, x0, IDS, "loss", TS, SCHED, 0, dtype=torch.float64)
    torch.testing.assert_close(cast, reference_gradients(a64, x0, IDS, "loss", TS, SCHED, 0))
    assert next(unet32.parameters()).dtype == torch.float32  # module untouched


def test_batch_size_chunk_and_order_invariance(unet64, x0):
    a = UNet2DAdapter(unet64)
    full = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 0)
    chunked = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 0, chunk_size=2)
    single = per_sample_gradients(a, x0[1:2], IDS[1:2], "square", TS, SCHED, 0)
    rev = per_sample_gradients(a, x0.flip(0), IDS[::-1], "square", TS, SCHED, 0)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single[0], full[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rev.flip(0), full, rtol=1e-12, atol=1e-14)
    other_ids = per_sample_gradients(a, x0, [1, 2, 3], "square", TS, SCHED, 0)
    assert not torch.allclose(other_ids, full)  # the noise follows the example id


def test_x0_per_timestep_form(unet64, x0):
    a = UNet2DAdapter(unet64)
    same = x0.unsqueeze(1).expand(-1, len(TS), -1, -1, -1)
    torch.testing.assert_close(
        per_sample_gradients(a, same, IDS, "loss", TS, SCHED, 0),
        per_sample_gradients(a, x0, IDS, "loss", TS, SCHED, 0),
    )
    gen = torch.Generator().manual_seed(2)
    per_t = torch.rand(len(IDS), len(TS), 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    fast = per_sample_gradients(a, per_t, IDS, "loss", TS, SCHED, 0)
    ref = reference_gradients(a, per_t, IDS, "loss", TS, SCHED, 0)
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="K=2"):
        per_sample_gradients(a, per_t[:, :2], IDS, "loss", TS, SCHED, 0)


def test_param_names_subset_is_columns_of_full(unet64, x0):
    a = UNet2DAdapter(unet64)
    names = ["conv_out.weight", "down_blocks.1.attentions.0.to_q.weight", "conv_in.bias"]
    order = param_order(unet64, names)
    assert [n for n, _ in order] == ["conv_in.bias", "down_blocks.1.attentions.0.to_q.weight",
                                     "conv_out.weight"]  # model order, not the given order
    full_order = param_order(unet64)
    offsets, off = {}, 0
    for n, numel in full_order:
        offsets[n] = (off, off + numel)
        off += numel
    full = per_sample_gradients(a, x0, IDS, "l2", TS, SCHED, 0)
    sub = per_sample_gradients(a, x0, IDS, "l2", TS, SCHED, 0, param_names=names)
    cols = torch.cat([full[:, slice(*offsets[n])] for n, _ in order], dim=1)
    torch.testing.assert_close(sub, cols, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="unknown parameter names"):
        param_order(unet64, ["nope.weight"])


def test_frozen_params_default_selection():
    model = tiny_unet()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("conv_out"))
    assert [n for n, _ in param_order(model)] == ["conv_out.weight", "conv_out.bias"]


def test_class_conditioning_is_vmapped(x0):
    model = tiny_unet(num_class_embeds=3).double()
    a = UNet2DAdapter(model)
    cond = {"class_labels": torch.tensor([2, 0, 1])}
    fast = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 0, cond=cond)
    ref = reference_gradients(a, x0, IDS, "square", TS, SCHED, 0, cond=cond)
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-12)
    other = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 0,
                                 cond={"class_labels": torch.tensor([0, 0, 1])})
    assert not torch.allclose(other[0], fast[0]) and torch.allclose(other[1:], fast[1:])


def test_train_mode_restored(x0):
    model = tiny_unet().train()
    per_sample_gradients(UNet2DAdapter(model), x0, IDS, "loss", TS, SCHED, 0)
    assert model.training


def test_non_finite_gradients_name_the_example(unet64, x0):
    grads = torch.zeros(3, 5)
    grads[1, 2] = float("nan")
    grads[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"example ids \[0, 9\]"):
        check_finite(grads, IDS)
    bad = x0.clone().double()
    bad[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"example ids \[9\]"):
        per_sample_gradients(UNet2DAdapter(unet64), bad, IDS, "loss", TS, SCHED, 0)


def test_output_values_match_direct_evaluation(unet64, x0):
    a = UNet2DAdapter(unet64)
    vals = output_values(a, x0, IDS, "loss", TS, SCHED, noise_seed=5, batch_size=4)
    assert vals.shape == (3, 3)
    torch.testing.assert_close(
        output_values(a, x0, IDS, "loss", TS, SCHED, noise_seed=5, batch_size=9), vals
    )
    eps = example_noise(5, IDS, 3, (1, 8, 8), dtype=torch.float64)
    abar = SCHED.alphas_cumprod[TS].view(1, 3, 1, 1, 1)
    x_t = abar.sqrt() * x0.double().unsqueeze(1) + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = unet64(x_t.flatten(0, 1), TS.repeat(3)).sample.view(3, 3, 1, 8, 8)
    torch.testing.assert_close(vals, ((pred - eps) ** 2).mean(dim=(-3, -2, -1)))


def test_input_validation(unet64, x0):
    a = UNet2DAdapter(unet64)
    with pytest.raises(ValueError, match="example ids"):
        per_sample_gradients(a, x0, IDS[:2], "loss", TS, SCHED, 0)
    with pytest.raises(ValueError, match="unknown output"):
        per_sample_gradients(a, x0, IDS, "mse", TS, SCHED, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_gradients(a, x0, IDS, "loss", TS, SCHED, 0, chunk_size=0)
    with pytest.raises(ValueError, match="image tensor"):
        a.prepare(x0[0])
