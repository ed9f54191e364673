"""DAS (dtrak.methods.das): every part against a direct computation on tiny data.

Per-timestep and unit-normalised gradients against a per-(example, timestep) backward loop in
float64; the DAS scores of all four variants against a plain inverse and per-example
leverages; the residual weights against a loop of forward passes; the registered methods
against the direct features; a killed residual computation resumes to the same weights.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from dtrak import scoring
from dtrak.config import preset
from dtrak.families import UNet2DAdapter, get_family
from dtrak.families.unet2d import build_unet, save_unet
from dtrak.featurize import FeatureSpec, _check_engine, projector_for
from dtrak.gradients import (
    param_order,
    per_sample_gradients,
    per_sample_unit_gradients,
    per_timestep_gradients,
)
from dtrak.methods import Context, default_lambda, get_method, method_lambda_grid
from dtrak.methods.das import residual_weights
from dtrak.noise import ScheduleConstants, add_noise, example_noise, timesteps
from dtrak.outputs import get_output
from dtrak.seeding import seed_from
from dtrak.store import make_store, open_store

VARIANTS = {"das": (False, False), "das-sq": (False, True), "das-loo": (True, False),
            "das-loo-sq": (True, True)}


def _cfg():
    cfg = preset("tiny")
    return replace(cfg, attribution=replace(cfg.attribution, proj_dim=48, n_timesteps=3,
                                            batch_size=4),
                   das=replace(cfg.das, residual_timesteps=7))


def _model(dtype=torch.float32):
    return build_unet(_cfg().model, 1, 8, seed=0).to(dtype)


def _sched():
    return ScheduleConstants.from_scheduler(get_family("unet2d").scheduler(_cfg().model))


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _reference_per_timestep(model, x0, ids, output, ts, sched, seed):
    """``[B, K, p]`` by one autograd.grad per (example, timestep), in the model's dtype."""
    eps = example_noise(seed, ids, len(ts), tuple(x0.shape[1:]), dtype=x0.dtype)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    fn = get_output(output)
    out = torch.empty(len(ids), len(ts), sum(p.numel() for p in params), dtype=x0.dtype)
    for b in range(len(ids)):
        for k, t in enumerate(ts):
            tt = t.reshape(1)
            x_t = add_noise(x0[b:b + 1], eps[b, k:k + 1], tt, sched.alphas_cumprod)
            f = fn(model(x_t, tt).sample, eps[b, k:k + 1], tt, sched).sum()
            grads = torch.autograd.grad(f, params)
            out[b, k] = torch.cat([g.reshape(-1) for g in grads])
    return out


def test_per_timestep_and_unit_gradients_match_a_backward_loop_float64():
    model = _model(torch.float64)
    sched, x0, ids = _sched(), _images(3, 1).double(), torch.tensor([4, 0, 9])
    ts = torch.tensor([3, 250, 700])
    ad = UNet2DAdapter(model)
    ref = _reference_per_timestep(model, x0, ids, "avg", ts, sched, seed=5)
    got = per_timestep_gradients(ad, x0, ids, "avg", ts, sched, noise_seed=5)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # their mean over K is the ordinary feature
    torch.testing.assert_close(got.mean(1), per_sample_gradients(ad, x0, ids, "avg", ts, sched, 5),
                               rtol=1e-9, atol=1e-12)
    unit = per_sample_unit_gradients(ad, x0, ids, "avg", ts, sched, noise_seed=5)
    torch.testing.assert_close(unit, (ref / ref.norm(dim=-1, keepdim=True)).mean(1),
                               rtol=1e-9, atol=1e-12)
    # a unit mean of K unit vectors has norm <= 1 (= 1 only if they all point alike)
    assert bool((unit.norm(dim=-1) <= 1 + 1e-12).all())


def test_unit_gradients_on_lora_layers_only():
    """A LoRA-adapted UNet: the unit features cover the trainable LoRA parameters only."""
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0"]), _model())
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:  # peft starts B at zero; make it random for a non-trivial gradient
            p.data.normal_(0, 0.1)
    model = model.double().eval()
    sched, x0, ids, ts = _sched(), _images(2, 6).double(), torch.tensor([1, 2]), torch.tensor([5, 600])
    ref = _reference_per_timestep(model, x0, ids, "avg", ts, sched, seed=2)
    got = per_sample_unit_gradients(UNet2DAdapter(model), x0, ids, "avg", ts, sched, noise_seed=2)
    assert got.shape[1] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(got, (ref / ref.norm(dim=-1, keepdim=True)).mean(1),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_das_scores_match_the_direct_formula(name, form):
    rng = np.random.default_rng(0)
    phi, phi_x = rng.normal(size=(9, 6)), rng.normal(size=(4, 6))
    e = rng.uniform(0.2, 1.0, size=9)
    loo, sq = VARIANTS[name]
    solver = scoring.KernelSolver(phi, form=form)
    for lam in (0.05, 3.0):
        got = scoring.das_scores(solver, phi_x, e, lam, leave_one_out=loo, square=sq)
        ref = scoring.das_reference(phi, phi_x, e, lam, leave_one_out=loo, square=sq)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    h = solver.leverages(0.05)
    inv = np.linalg.inv(phi.T @ phi + 0.05 * np.eye(6))
    np.testing.assert_allclose(h, np.einsum("nk,kl,nl->n", phi, inv, phi), rtol=1e-10)
    assert np.all((h > 0) & (h < 1))


def test_das_scores_refuse_bad_residual_weights():
    solver = scoring.KernelSolver(np.eye(3))
    with pytest.raises(ValueError, match="residual weights"):
        scoring.das_scores(solver, np.eye(3), np.ones(2), 1.0)
    with pytest.raises(ValueError, match="residual weights"):
        scoring.das_scores(solver, np.eye(3), np.array([1.0, np.nan, 1.0]), 1.0)


def _direct_residual(model, x0, sched, n_timesteps, seed):
    ts = timesteps("uniform", n_timesteps, len(sched.alphas_cumprod))
    noise_seed = seed_from(seed, "das-residual") % (2**62)
    eps = example_noise(noise_seed, torch.arange(len(x0)), n_timesteps, tuple(x0.shape[1:]))
    r = np.empty((len(x0), n_timesteps))
    with torch.no_grad():
        for b in range(len(x0)):
            for k, t in enumerate(ts):
                x_t = add_noise(x0[b:b + 1], eps[b, k:k + 1], t.reshape(1), sched.alphas_cumprod)
                pred = model(x_t, t.reshape(1)).sample
                r[b, k] = float((pred - eps[b, k:k + 1]).square().mean().sqrt())
    return (r / np.linalg.norm(r, axis=1, keepdims=True)).mean(1)


def test_residual_weights_match_a_loop_and_resume(tmp_path):
    model, sched, x0 = _model(), _sched(), _images(5, 2)
    ref = _direct_residual(model, x0, sched, 7, seed=3)
    got = residual_weights(UNet2DAdapter(model), x0, sched, 7, 3, tmp_path / "r", batch_size=2,
                           progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert np.all((got > 0) & (got <= 1))  # mean of a unit vector's entries
    # a killed run: only the first block was written; the rest is computed on resumption
    store = open_store(tmp_path / "r")
    partial = tmp_path / "partial"
    residual_weights(UNet2DAdapter(model), x0[:2], sched, 7, 3, partial, progress=False)
    first = open_store(partial).load()
    killed = tmp_path / "killed"
    st = make_store(killed, 5, 7, store.meta)
    st.write(np.arange(2), first)
    again = residual_weights(UNet2DAdapter(model), x0, sched, 7, 3, killed, batch_size=3,
                             progress=False)
    np.testing.assert_allclose(again, got, rtol=1e-6)
    with pytest.raises(ValueError):  # a store made with other settings is refused
        residual_weights(UNet2DAdapter(model), x0, sched, 5, 3, tmp_path / "r", progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("das")
    cfg = _cfg()
    save_unet(_model(), root / "model" / "unet")
    train, val = _images(8, 3), _images(3, 4)
    return Context(cfg, get_family("unet2d"), train, {"val": val}, root / "model" / "unet",
                   lambda m, s, f: root / "features" / m / s / f, progress=False)


def _direct_unit_features(ctx, set_name):
    model = _model()
    spec = ctx.spec("avg", unit=True)
    x0 = ctx.examples(set_name)
    g = per_sample_unit_gradients(UNet2DAdapter(model), x0, torch.arange(len(x0)), "avg",
                                  spec.timesteps(1000), ctx.sched,
                                  seed_from(spec.noise_seed, "set", set_name) % (2**62))
    p = sum(n for _, n in param_order(model))
    return projector_for(spec, p, "full").project(g).double().numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registered_das_methods_equal_the_direct_computation(world, name):
    method = get_method(name)
    assert method.uses_lambda and method.output == "avg" and dict(method.feature) == {"unit": True}
    phi, phi_x = _direct_unit_features(world, "train"), _direct_unit_features(world, "val")
    e = _direct_residual(_model(), world.train, world.sched, 7, seed=0)
    lam = default_lambda(world, method)
    assert lam == pytest.approx(1e-3 * np.einsum("ij,ij->", phi, phi) / len(phi), rel=1e-4)
    loo, sq = VARIANTS[name]
    got = method.score(world, "val", lam)
    ref = scoring.das_reference(phi, phi_x, e, lam, leave_one_out=loo, square=sq)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    grid = method_lambda_grid(world, method)
    assert grid[0] == pytest.approx(1e-6 * lam / 1e-3, rel=1e-6)
    # the unit features live in their own store, named apart from the plain avg features
    assert (world.feature_dir("full", "train", world.spec("avg", unit=True).name)
            / "meta.json").is_file()
    assert world.spec("avg", unit=True).name.endswith("-unit")


def test_unit_features_refuse_the_kron_projector():
    with pytest.raises(ValueError, match="unit"):
        _check_engine("hooks", FeatureSpec(output="avg", projector="kron", unit=True))
