"""Baselines (dtrak.methods, dtrak.clip): each method against a direct computation on tiny data.

The direct computations go around the Context and the feature store: per-sample gradients of
the models, projected with the same projector, and numpy formulas for the scores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dtrak import lds as lds_math
from dtrak import scoring
from dtrak.config import preset
from dtrak.families import UNet2DAdapter, get_family
from dtrak.families.unet2d import LabelledImages, build_unet, load_unet, save_unet
from dtrak.featurize import projector_for
from dtrak.gradients import output_values, param_order, per_sample_gradients
from dtrak.methods import METHODS, Context, baselines, get_method
from dtrak.methods import pool as pool_methods
from dtrak.noise import timesteps
from dtrak.paths import RunPaths
from dtrak.seeding import seed_from
from dtrak.stages.pools import POOL_SEED_BASE
from dtrak.stages.run import Run
from dtrak.stages.score import score_method

N_TRAIN, N_VAL, N_GEN, S_STEPS = 6, 3, 2, 4

BASELINES = ("random", "pixel-dot", "pixel-cos", "clip-dot", "clip-cos", "grad-dot", "grad-cos",
             "tracin-dot", "tracin-cos", "relative-if", "renorm-if", "journey-trak",
             "empirical-influence", "datamodel")


def _cfg(**attribution):
    cfg = preset("tiny")
    att = dict(proj_dim=32, n_timesteps=2, batch_size=4)
    att.update(attribution)
    return replace(cfg, attribution=replace(cfg.attribution, **att),
                   sampling=replace(cfg.sampling, steps=S_STEPS))


def _images(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1


def _context(cfg, train, sets, root, **kw) -> Context:
    return Context(cfg, get_family("unet2d"), train, sets, root / "model" / "unet",
                   lambda m, s, f: root / "features" / m / s / f, progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A hand-built context: a tiny full model, two checkpoints, random images."""
    root = tmp_path_factory.mktemp("baselines")
    cfg = _cfg()
    save_unet(build_unet(cfg.model, 1, 8, seed=0), root / "model" / "unet")
    for step, seed in ((10, 1), (20, 2)):
        save_unet(build_unet(cfg.model, 1, 8, seed=seed),
                  root / "model" / "checkpoints" / f"step-{step:07d}" / "unet")
    g = torch.Generator().manual_seed(0)
    train, val, gen = _images(g, N_TRAIN), _images(g, N_VAL), _images(g, N_GEN)
    traj = torch.rand(N_GEN, S_STEPS, 1, 8, 8, generator=g) * 2 - 1
    ctx = _context(cfg, train, {"val": val, "gen": gen}, root, trajectories={"gen": traj})
    return ctx


def _direct_features(ctx, model_dir, set_name, model_id, x0=None, ts=None, journey=False):
    """Projected loss-gradient features ``[n, k]`` straight from per_sample_gradients."""
    model = load_unet(model_dir)
    spec = ctx.spec("loss", journey=journey, **({"n_timesteps": len(ts)} if journey else {}))
    x0 = ctx.examples(set_name) if x0 is None else x0
    ts = spec.timesteps(1000) if ts is None else ts
    g = per_sample_gradients(UNet2DAdapter(model), x0, torch.arange(x0.shape[0]), "loss", ts,
                             ctx.sched, seed_from(spec.noise_seed, "set", set_name) % (2**62))
    p = sum(n for _, n in param_order(model))
    return projector_for(spec, p, model_id).project(g).float().numpy().astype(np.float64)


def _rows(x: torch.Tensor) -> np.ndarray:
    return x.reshape(x.shape[0], -1).double().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_all_baselines_registered_with_sign_and_outputs():
    for name in BASELINES:
        m = get_method(name)
        assert m is METHODS[name] and m.sign and m.description
        if m.uses_lambda:
            assert m.output == "loss" and "loss" in m.outputs
    assert get_method("grad-dot").outputs == ("loss",)
    assert not get_method("tracin-dot").outputs  # features of checkpoints, not the full model


def test_random_is_deterministic_and_uncorrelated():
    g = torch.Generator().manual_seed(1)
    ctx = _context(_cfg(), _images(g, 200), {"val": _images(g, 50), "gen": _images(g, 50)},
                   Path("unused"))
    rnd = METHODS["random"].score
    a = rnd(ctx, "val", None)
    assert a.shape == (50, 200) and a.dtype == np.float32
    np.testing.assert_array_equal(a, rnd(ctx, "val", None))
    assert not np.array_equal(a, rnd(ctx, "gen", None))
    pix = METHODS["pixel-dot"].score(ctx, "val", None)
    assert abs(np.corrcoef(a.ravel(), pix.ravel())[0, 1]) < 0.05
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05


def test_pixel_dot_and_cosine(world):
    t, z = _rows(world.examples("val")), _rows(world.train)
    dot = METHODS["pixel-dot"].score(world, "val", None)
    assert dot.shape == (N_VAL, N_TRAIN) and dot.dtype == np.float32
    np.testing.assert_allclose(dot, t @ z.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(METHODS["pixel-cos"].score(world, "val", None),
                               _unit(t) @ _unit(z).T, rtol=1e-5, atol=1e-6)


def test_pixel_scores_read_pixels_of_labelled_and_encoded_examples(world):
    """Class-labelled examples give their images; examples without pixels (encoded latents)
    take them from Context.images, or are refused with a message."""
    labelled = replace(world, train=LabelledImages(world.train, torch.zeros(N_TRAIN)),
                       sets={"val": LabelledImages(world.examples("val"), torch.ones(N_VAL))})
    want = METHODS["pixel-cos"].score(world, "val", None)
    np.testing.assert_allclose(METHODS["pixel-cos"].score(labelled, "val", None), want)
    opaque = replace(world, train=object(), sets={"val": object()})
    with pytest.raises(ValueError, match="hold no pixels"):
        METHODS["pixel-cos"].score(opaque, "val", None)
    given = replace(opaque, images={"train": world.train, "val": world.examples("val")})
    np.testing.assert_allclose(METHODS["pixel-cos"].score(given, "val", None), want)


def test_grad_dot_and_cosine(world):
    phi_t = _direct_features(world, world.full_model_dir, "val", "full")
    phi_z = _direct_features(world, world.full_model_dir, "train", "full")
    dots = phi_t @ phi_z.T  # float32 features: errors relative to the largest entry
    np.testing.assert_allclose(METHODS["grad-dot"].score(world, "val", None), dots,
                               rtol=1e-4, atol=1e-5 * np.abs(dots).max())
    np.testing.assert_allclose(METHODS["grad-cos"].score(world, "val", None),
                               _unit(phi_t) @ _unit(phi_z).T, rtol=1e-4, atol=1e-5)


def test_tracin_averages_checkpoint_dots(world):
    ckpt_root = world.full_model_dir.parent / "checkpoints"
    per_ckpt = []
    for step in (10, 20):
        d = ckpt_root / f"step-{step:07d}" / "unet"
        per_ckpt.append((_direct_features(world, d, "gen", f"ckpt-{step}"),
                         _direct_features(world, d, "train", f"ckpt-{step}")))
    dots = [t @ z.T for t, z in per_ckpt]
    cosines = [_unit(t) @ _unit(z).T for t, z in per_ckpt]
    np.testing.assert_allclose(METHODS["tracin-dot"].score(world, "gen", None),
                               np.mean(dots, axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(METHODS["tracin-cos"].score(world, "gen", None),
                               np.mean(cosines, axis=0), rtol=1e-4, atol=1e-5)
    # the checkpoint features differ from the full model's (another model, another projection)
    assert not np.allclose(per_ckpt[0][1], world.features("train", "loss"))
    # naming steps: only that checkpoint
    one = replace(world, cfg=_cfg(checkpoints=(20,)), _features={})
    np.testing.assert_allclose(METHODS["tracin-dot"].score(one, "gen", None), dots[1],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="step"):
        METHODS["tracin-dot"].score(replace(world, cfg=_cfg(checkpoints=(30,))), "gen", None)


def test_tracin_checkpoint_choice(tmp_path):
    model_dir = tmp_path / "model" / "unet"
    for step in (100, 200, 300, 400, 500, 600):
        d = tmp_path / "model" / "checkpoints" / f"step-{step:07d}" / "unet"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (tmp_path / "model" / "checkpoints" / "step-0000700.tmp" / "unet").mkdir(parents=True)
    steps = [s for s, _ in baselines.tracin_checkpoints(model_dir)]
    assert steps == [100, 300, 400, 600]  # linspace(0, 5, 4).round() = 0, 2, 3, 5
    assert [s for s, _ in baselines.tracin_checkpoints(model_dir, (200, 500))] == [200, 500]
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        baselines.tracin_checkpoints(tmp_path / "none" / "unet")


def test_relative_and_renormalized_influence(world):
    phi_t = _direct_features(world, world.full_model_dir, "val", "full")
    phi = _direct_features(world, world.full_model_dir, "train", "full")
    lam = 0.1 * float(np.mean(np.sum(phi**2, axis=1)))
    hess = phi.T @ phi + lam * np.eye(phi.shape[1])
    trak = phi_t @ np.linalg.solve(hess, phi.T)
    infl_norms = np.linalg.norm(np.linalg.solve(hess, phi.T), axis=0)  # ||H^-1 phi(z)||
    np.testing.assert_allclose(METHODS["relative-if"].score(world, "val", lam),
                               trak / infl_norms, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(METHODS["renorm-if"].score(world, "val", lam),
                               trak / np.linalg.norm(phi, axis=1), rtol=2e-3, atol=1e-6)


def test_journey_trak_features_along_the_trajectory(world):
    steps = baselines.journey_steps(S_STEPS, 2)
    assert steps.tolist() == [0, 3]
    sampler_ts = baselines.sampler_timesteps(world)
    assert len(sampler_ts) == S_STEPS and sampler_ts == sorted(sampler_ts, reverse=True)
    ts = torch.tensor([sampler_ts[0], sampler_ts[3]])
    x0 = world.trajectories["gen"][:, [0, 3]]  # [T, K, C, H, W]
    direct = _direct_features(world, world.full_model_dir, "gen", "full", x0=x0, ts=ts, journey=True)
    np.testing.assert_allclose(baselines.journey_features(world), direct, rtol=1e-4, atol=1e-7)
    # differs from the ordinary features of the final images
    assert not np.allclose(direct, world.features("gen", "loss"))
    phi = world.features("train", "loss").astype(np.float64)
    lam = 0.1 * float(np.mean(np.sum(phi**2, axis=1)))
    np.testing.assert_allclose(METHODS["journey-trak"].score(world, "gen", lam),
                               scoring.solve_reference(phi, direct, lam), rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="journey-trak needs generated targets"):
        METHODS["journey-trak"].score(world, "val", lam)


def test_journey_reads_the_run_timesteps(world):
    recorded = replace(world, sampler_timesteps=[900, 600, 300, 7])
    assert baselines.sampler_timesteps(recorded) == [900, 600, 300, 7]
    assert baselines.journey_steps(4, 10).tolist() == [0, 1, 2, 3]  # K > S: every step


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=30, patch_size=6),
        projection_dim=12)
    transformers.CLIPModel(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": 30}, "do_center_crop": True,
        "crop_size": {"height": 30, "width": 30}, "do_normalize": True,
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
        "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
        "do_convert_rgb": True}))
    return path


def _manual_clip(path, images):
    """get_image_features on images resized by hand with the saved mean/std."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path).eval()
    x = ((images + 1) / 2).expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=(30, 30), mode="bicubic", antialias=True)
    x = (x.clamp(0, 1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out.double().numpy()


def test_clip_dot_and_cosine(world, clip_dir):
    ctx = replace(world, cfg=_cfg(clip_path=str(clip_dir)))
    e_t, e_z = _manual_clip(clip_dir, ctx.examples("val")), _manual_clip(clip_dir, ctx.train)
    np.testing.assert_allclose(METHODS["clip-dot"].score(ctx, "val", None), e_t @ e_z.T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(METHODS["clip-cos"].score(ctx, "val", None),
                               _unit(e_t) @ _unit(e_z).T, rtol=1e-4, atol=1e-5)


def test_clip_embed_matches_the_image_processor_and_caches(clip_dir):
    from PIL import Image

    from dtrak.clip import clip_cosine, clip_embed, load_clip

    model, processor = load_clip(clip_dir)
    assert processor is not None and list(processor.image_mean) == [0.5, 0.4, 0.3]
    images = _images(torch.Generator().manual_seed(3), 4)
    emb = clip_embed(images, clip_dir, batch_size=3)
    assert emb.shape == (4, 12) and emb.dtype == np.float32
    assert clip_embed(images, clip_dir) is emb  # cached per tensor
    np.testing.assert_allclose(clip_embed(images.numpy(), clip_dir), emb, rtol=1e-6, atol=1e-7)
    # the official processor (PIL bicubic on uint8) gives nearly the same embeddings
    u8 = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    pixels = processor(images=[Image.fromarray(a).convert("RGB") for a in u8],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels)
    ref = (ref if isinstance(ref, torch.Tensor) else ref.pooler_output).double().numpy()
    assert np.min(np.sum(_unit(ref) * _unit(emb.astype(np.float64)), axis=1)) > 0.99
    # row-wise cosine
    other = images.flip(0)
    e2 = clip_embed(other, clip_dir)
    np.testing.assert_allclose(clip_cosine(images, other, clip_dir),
                               np.sum(_unit(emb.astype(np.float64)) * _unit(e2), axis=1),
                               rtol=1e-5, atol=1e-6)


def test_clip_without_path_says_how_to_fix(world):
    with pytest.raises(ValueError, match=r"--set attribution\.clip_path=DIR"):
        METHODS["clip-dot"].score(world, "val", None)


# ----------------------------------------------------------------------------- model pool


def _pool_world(tmp_path, n_train: int, n_pool: int, seed: int):
    """A hand-built run: ``n_train`` images, 3 val targets and a pool that trains in 2 steps."""
    cfg = _cfg()
    cfg = replace(cfg, train=replace(cfg.train, steps=2, batch_size=4, checkpoint_every=2),
                  lds=replace(cfg.lds, n_subsets=n_pool, seeds=(0,), eval_timesteps=3,
                              noise_seeds=(0,)))
    g = torch.Generator().manual_seed(seed)
    train, val = _images(g, n_train), _images(g, 3)
    labels = [0, 1] * (n_train // 2)
    run = Run(RunPaths(tmp_path), cfg, progress=False)
    ctx = _context(cfg, train, {"val": val}, tmp_path, paths=run.paths)
    run.__dict__["dataset"] = SimpleNamespace(  # a stand-in data set: just what pools read
        train=SimpleNamespace(images=train, labels=np.array(labels), files=None),
        class_names=["0", "1"])
    run.__dict__["context"] = ctx
    return cfg, run, train, val, labels


def test_empirical_influence_and_datamodel_from_a_pool(tmp_path):
    n_train, n_pool = 8, 2
    cfg, run, train, val, labels = _pool_world(tmp_path, n_train, n_pool, seed=5)
    ctx = run.context
    threads = torch.get_num_threads()
    with pytest.raises(FileNotFoundError, match="score stage trains the pool"):
        METHODS["empirical-influence"].score(ctx, "val", None)  # methods never train
    ei = score_method(run, METHODS["empirical-influence"], "val", None)
    assert torch.get_num_threads() == threads
    masks = np.load(tmp_path / "pool" / "masks.npy")
    np.testing.assert_array_equal(masks, lds_math.subset_masks(
        np.array(labels), n_pool, 0.5, seed_base=POOL_SEED_BASE))
    assert not np.array_equal(masks, lds_math.subset_masks(np.array(labels), n_pool, 0.5, 42))
    # outputs: L_Simple of each pool model, computed directly
    ts = timesteps("uniform", 3, 1000)
    outputs = np.stack([
        output_values(UNet2DAdapter(load_unet(tmp_path / "pool" / "models" / f"m{m:03d}-s0"
                                              / "unet")),
                      val, torch.arange(3), "loss", ts, ctx.sched,
                      noise_seed=1_000_003).mean(1).double().numpy() for m in range(n_pool)])
    np.testing.assert_allclose(np.load(tmp_path / "pool" / "truth" / "val.npy")[0], outputs,
                               rtol=1e-6)
    direct = np.zeros((3, n_train))
    for z in range(n_train):
        inc = masks[:, z]
        if inc.any() and (~inc).any():
            direct[:, z] = outputs[~inc].mean(0) - outputs[inc].mean(0)
    np.testing.assert_allclose(ei, direct, rtol=1e-5, atol=1e-7)

    mtime = (tmp_path / "pool" / "models" / "m000-s0" / "done.json").stat().st_mtime
    dm = score_method(run, METHODS["datamodel"], "val", None)
    assert (tmp_path / "pool" / "models" / "m000-s0" / "done.json").stat().st_mtime == mtime
    alpha = json.loads((tmp_path / "pool" / "datamodel-val.json").read_text())["ridge_alpha"]
    assert alpha == n_pool / 4  # too few pool models to cross-validate
    from sklearn.linear_model import Ridge

    coef = Ridge(alpha=alpha).fit(masks.astype(float), outputs).coef_  # [T, N]
    np.testing.assert_allclose(dm, -coef, rtol=1e-4, atol=1e-7)


def test_datamodel_alpha_is_the_leave_one_out_best():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    masks = rng.random((12, 6)) < 0.5
    outputs = masks @ rng.normal(size=(6, 3)) * 0.1 + rng.normal(size=(12, 3))
    loo = []
    for a in pool_methods.DATAMODEL_ALPHAS:
        err = 0.0
        for i in range(12):
            keep = np.arange(12) != i
            fit = Ridge(alpha=a).fit(masks[keep].astype(float), outputs[keep])
            err += np.sum((fit.predict(masks[i:i + 1].astype(float)) - outputs[i]) ** 2)
        loo.append(err)
    expected = pool_methods.DATAMODEL_ALPHAS[int(np.argmin(loo))]
    assert pool_methods.datamodel_alpha(masks, outputs) == pytest.approx(expected)


def test_pool_methods_need_a_run(world):
    with pytest.raises(ValueError, match="run directory"):
        METHODS["datamodel"].score(world, "val", None)


def test_method_at_k_timesteps_uses_k_timestep_features(world):
    """``name@K`` is the same method on features taken at K timesteps (the ablation's K)."""
    m = get_method("dtrak@3")
    assert m.name == "dtrak@3" and m.n_timesteps == 3 and m.output == "square" and m.kernel
    assert get_method("dtrak@3") is m and get_method("dtrak").n_timesteps is None
    kctx = m.context(world)
    assert kctx.cfg.attribution.n_timesteps == 3 and world.cfg.attribution.n_timesteps == 2
    assert kctx.spec("square").name != world.spec("square").name
    # direct: square-gradient features at 3 uniform timesteps, projected like the store's
    model = load_unet(world.full_model_dir)
    spec = kctx.spec("square")
    p = sum(n for _, n in param_order(model))

    def direct(set_name):
        x0 = world.examples(set_name)
        g = per_sample_gradients(UNet2DAdapter(model), x0, torch.arange(x0.shape[0]), "square",
                                 spec.timesteps(1000), world.sched,
                                 seed_from(spec.noise_seed, "set", set_name) % (2**62))
        return projector_for(spec, p, "full").project(g).float().numpy().astype(np.float64)

    phi, phi_t = direct("train"), direct("val")
    lam = 1e-3 * float(np.mean(np.sum(phi**2, axis=1)))
    np.testing.assert_allclose(m.score(world, "val", lam),
                               scoring.solve_reference(phi, phi_t, lam), rtol=2e-3, atol=1e-6)
    # the K = 2 method is a different computation, and both solvers are kept side by side
    assert not np.allclose(get_method("dtrak").score(world, "val", lam),
                           m.score(world, "val", lam), atol=1e-6)
    assert world.solver("square") is not kctx.solver("square")
    # any method takes @K; a bad K says how to write it
    assert get_method("relative-if@3").n_timesteps == 3
    with pytest.raises(ValueError, match="number of timesteps"):
        get_method("trak@ten")
    with pytest.raises(ValueError, match="unknown attribution method"):
        get_method("nope@10")


def test_trak_ensemble_averages_the_pool_models_kernels(tmp_path):
    cfg, run, *_ = _pool_world(tmp_path, n_train=8, n_pool=3, seed=6)
    ctx = run.context
    save_unet(build_unet(cfg.model, 1, 8, seed=0), tmp_path / "model" / "unet")
    ens = pool_methods._ensemble("test-ensemble", "loss", 2)
    lam = 0.1 * ctx.solver("loss").trace_scale
    got = score_method(run, ens, "val", lam)
    # only the 2 members were trained, not the whole pool
    models = tmp_path / "pool" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["m000-s0", "m001-s0"]
    direct = []
    for i in range(2):
        d = models / f"m{i:03d}-s0" / "unet"
        phi = _direct_features(ctx, d, "train", f"pool-m{i:03d}")
        phi_t = _direct_features(ctx, d, "val", f"pool-m{i:03d}")
        lam_i = 0.1 * float(np.mean(np.sum(phi**2, axis=1)))
        direct.append(scoring.solve_reference(phi, phi_t, lam_i))
    np.testing.assert_allclose(got, np.mean(direct, axis=0), rtol=2e-3, atol=1e-6)
    # the members differ from each other and from the full model
    assert not np.allclose(direct[0], direct[1], atol=1e-6)
    assert get_method("trak-ensemble").uses_lambda and get_method("dtrak-ensemble").output == \
        "square"
    small = Run(run.paths, replace(cfg, lds=replace(cfg.lds, n_subsets=1)), progress=False)
    small.__dict__.update(dataset=run.dataset, context=ctx)
    with pytest.raises(ValueError, match="needs 2 pool models"):
        score_method(small, ens, "val", lam)
