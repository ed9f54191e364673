"""K-FAC / EK-FAC influence (dtrak.methods.influence) against direct computations.

The direct computations form the GGN ``G = mean over factor rows of J^T 2I J`` explicitly in
float64 (J: the Jacobian of the noise prediction w.r.t. the Linear / Conv2d parameters in
kronfluence's layout, weight ``[out, in]`` with the bias as a last column) and solve
``(G + lam I) x = grad L``; gradients are taken by plain autograd on the unwrapped model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from scipy.linalg import hadamard
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, jacrev

pytest.importorskip("kronfluence", reason="pip install --no-deps kronfluence==1.0.1 einconv")

from dtrak import pipeline  # noqa: E402
from dtrak.artefacts import DamagedArtefactError  # noqa: E402
from dtrak.config import preset  # noqa: E402
from dtrak.families import get_family  # noqa: E402
from dtrak.families.unet2d import (  # noqa: E402
    LabelledImages,
    build_unet,
    load_unet,
    save_unet,
    unet_kwargs,
)
from dtrak.methods import METHODS, Context, get_method, influence  # noqa: E402
from dtrak.noise import ScheduleConstants, add_noise  # noqa: E402
from dtrak.runtime import Placement  # noqa: E402

F64 = Placement(torch.device("cpu"), torch.float64)


def _cfg(model=None, **inf):
    cfg = preset("tiny")
    inf = {"factor_draws": 2, "train_draws": 2, "target_draws": 2, "batch_size": 16, **inf}
    return replace(cfg, model=replace(cfg.model, **(model or {})),
                   influence=replace(cfg.influence, **inf))


def _context(cfg, train, sets, root: Path, **kw) -> Context:
    return Context(cfg, get_family("unet2d"), train, sets, root / "model" / "unet",
                   lambda m, s, f: root / "features" / m / s / f, progress=False, **kw)


def _images(seed: int, n: int, shape=(1, 8, 8)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _layout(grads: dict[str, torch.Tensor], modules: list[str]) -> torch.Tensor:
    """Parameter tensors with a leading dim ``[L, *shape]`` -> ``[L, P]`` in kronfluence's
    layout: per layer ``[out, in (+1 for the bias)]``, layer after layer."""
    parts = []
    for m in modules:
        w = grads[f"{m}.weight"]
        w = w.reshape(w.shape[0], w.shape[1], -1)
        if f"{m}.bias" in grads:
            w = torch.cat([w, grads[f"{m}.bias"][..., None]], dim=-1)
        parts.append(w.flatten(1))
    return torch.cat(parts, dim=1)


def _rows(ctx, stream, examples, i, draws):
    """``(x_t, t, eps)`` of example i's rows of a stream, as the method draws them."""
    x0 = examples[i:i + 1].double()
    drawn = [influence.row_draw(ctx.cfg.influence.seed, stream, i, r, tuple(x0.shape[1:]),
                                ctx.sched.T) for r in range(draws)]
    t = torch.tensor([d[0] for d in drawn])
    eps = torch.stack([d[1] for d in drawn]).double()
    return add_noise(x0.expand(draws, *x0.shape[1:]), eps, t, ctx.sched.alphas_cumprod), t, eps


def _direct_gradients(ctx, predict, params, modules, set_name, draws):
    """``[n, P]`` draw-averaged gradients of sum (pred - eps)^2 by plain autograd."""
    examples, out = ctx.examples(set_name), []
    for i in range(len(examples)):
        x_t, t, eps = _rows(ctx, set_name, examples, i, draws)
        loss = (predict(params, x_t, t) - eps).pow(2).sum() / draws
        g = torch.autograd.grad(loss, list(params.values()))
        out.append(_layout({k: v[None] for k, v in zip(params, g, strict=True)}, modules))
    return torch.cat(out)


def _direct_ggn(ctx, predict, params, modules, draws):
    """``G = mean over factor rows of J^T 2I J`` over the tracked parameters."""
    jac = []
    for i in range(len(ctx.train)):
        x_t, t, _ = _rows(ctx, "factors", ctx.train, i, draws)
        for r in range(draws):
            def f(p, x=x_t[r:r + 1], t_r=t[r:r + 1]):
                return predict(p, x, t_r).flatten()

            jac.append(_layout(jacrev(f)(params), modules).detach())
    j = torch.cat(jac)
    return 2.0 * j.T @ j / (len(ctx.train) * draws)


def _solve(G, lam, q, g):
    return (q @ torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), g.T)).numpy()


# ----------------------------------------------------------------------------- exact K-FAC


class _TokenLinear(nn.Module):
    """``[B, 1, 2, 4]`` -> two tokens of 4 features -> one Linear -> ``[B, 1, 2, 4]``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x.reshape(x.shape[0], 2, 4)).reshape(x.shape)


class _Adapter:
    def __init__(self, module):
        self.module = module

    def prepare(self, batch):
        return batch, {}

    def predict(self, x_t, t, cond):
        return self.module(x_t)

    def attributed_parameters(self):
        return None


def _designed_draws(monkeypatch):
    """Factor rows whose Fisher samples make the Monte-Carlo Fisher the GGN exactly: the
    draws of an example share (t, eps), and their z are the rows of a d x d Hadamard matrix
    H (d outputs), so that mean_r z_r z_r^T = H^T H / d = I (entries +-1: exact in float32)."""
    plain = influence.row_draw

    def draw(seed, stream, i, r, shape, T):
        if stream != "factors":
            return plain(seed, stream, i, r, shape, T)
        t, eps, _ = plain(seed, stream, i, 0, shape, T)
        h = hadamard(math.prod(shape))
        return t, eps, torch.tensor(h[r], dtype=torch.float32).reshape(shape)

    monkeypatch.setattr(influence, "row_draw", draw)


def test_kfac_and_ekfac_equal_the_exact_ggn_where_kfac_is_exact(tmp_path, monkeypatch):
    """One Linear on tokens (K-FAC-expand is exact: the GGN is sum_s a_s a_s^T (x) 2I, bias
    included as a constant input) with designed Fisher samples: both methods equal the
    exact GGN-inverse influence, and the damping scale is trace(G) / P."""
    _designed_draws(monkeypatch)
    model = _TokenLinear().double()
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    d = 8  # outputs per row: one factor draw per output coordinate
    cfg = _cfg(factor_draws=d, train_draws=3, target_draws=2, batch_size=5)
    train, val = _images(0, 5, (1, 2, 4)), _images(1, 3, (1, 2, 4))
    ctx = _context(cfg, train, {"val": val}, tmp_path, placement=F64)
    ctx.__dict__.update(full_adapter=_Adapter(model), sched=ScheduleConstants.linear())
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def predict(p, x_t, t):
        return functional_call(model, p, (x_t,))

    modules = ["proj"]
    G = _direct_ggn(ctx, predict, params, modules, d)
    q = _direct_gradients(ctx, predict, params, modules, "val", 2)
    g = _direct_gradients(ctx, predict, params, modules, "train", 3)
    scale = float(torch.trace(G)) / G.shape[0]
    for strategy in influence.STRATEGIES:
        assert influence.mean_eigenvalue(ctx, strategy) == pytest.approx(scale, rel=1e-9)
        for lam in (0.01 * scale, 0.1 * scale, 10 * scale):
            exact = _solve(G, lam, q, g)
            np.testing.assert_allclose(influence.scores(ctx, "val", lam, strategy), exact,
                                       rtol=1e-5, atol=1e-6 * np.abs(exact).max())


# ----------------------------------------------------------------------------- a tiny UNet


@pytest.fixture(scope="module")
def unet_world(tmp_path_factory):
    """A 3.3K-parameter UNet (channels 2, 4; attention at 8x8 -> 4x4), float64 context."""
    root = tmp_path_factory.mktemp("influence")
    cfg = _cfg(model={"block_out_channels": (2, 4)}, factor_draws=4, train_draws=4,
               target_draws=4, batch_size=16)
    save_unet(build_unet(cfg.model, 1, 8, seed=0), root / "model" / "unet")
    ctx = _context(cfg, _images(0, 8), {"val": _images(1, 4)}, root, placement=F64)
    return ctx, root


def _unet_direct(ctx):
    """``(predict, params, modules)`` of the world's UNet, unwrapped, float64."""
    unet = load_unet(ctx.full_model_dir).double()
    modules = influence.influence(ctx).modules
    names = {n for m in modules for n in (f"{m}.weight", f"{m}.bias")}
    params = {k: v.detach().clone().requires_grad_() for k, v in unet.named_parameters()
              if k in names}

    def predict(p, x_t, t):
        return functional_call(unet, p, (x_t, t)).sample

    return predict, params, modules


def test_tracked_layers_are_the_linear_and_conv_layers(unet_world):
    ctx, _ = unet_world
    unet = load_unet(ctx.full_model_dir)
    expected = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert influence.influence(ctx).modules == expected
    assert any(isinstance(m, nn.GroupNorm) for m in unet.modules())  # left out
    assert "conv_norm_out" not in expected
    # kronfluence wrapped a copy: the context's model is as it was
    full = ctx.adapter("full").module
    assert [n for n, _ in full.named_parameters()] == [n for n, _ in unet.named_parameters()]
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention
def test_ekfac_ranks_like_the_exact_ggn_influence(unet_world):
    ctx, _ = unet_world
    predict, params, modules = _unet_direct(ctx)
    G = _direct_ggn(ctx, predict, params, modules, ctx.cfg.influence.factor_draws)
    q = _direct_gradients(ctx, predict, params, modules, "val", 4)
    g = _direct_gradients(ctx, predict, params, modules, "train", 4)
    for strategy in influence.STRATEGIES:
        lam = 0.1 * influence.mean_eigenvalue(ctx, strategy)
        exact = _solve(G, lam, q, g)
        got = influence.scores(ctx, "val", lam, strategy)
        rho = spearmanr(exact.ravel(), got.ravel()).statistic
        rows = np.mean([spearmanr(a, b).statistic for a, b in zip(exact, got, strict=True)])
        print(f"{strategy}-if vs exact GGN influence (p = {G.shape[0]}, lam = 0.1 x mean "
              f"eigenvalue): Spearman {rho:.3f} over all pairs, {rows:.3f} per target")
        assert rho > 0.5


def test_scores_are_those_of_explicitly_averaged_gradients(unet_world, tmp_path):
    """The stored rotated gradients are the draw-averaged autograd gradients, rotated into
    the saved eigenbasis; scores do not depend on influence.batch_size."""
    ctx, root = unet_world
    predict, params, modules = _unet_direct(ctx)
    inf = influence.influence(ctx)
    q = _direct_gradients(ctx, predict, params, modules, "val", 4)
    g = _direct_gradients(ctx, predict, params, modules, "train", 4)

    def rotate(x):
        parts, start = [], 0
        for q_g, q_a in inf.basis:
            size = q_g.shape[0] * q_a.shape[0]
            w = x[:, start:start + size].reshape(-1, q_g.shape[0], q_a.shape[0])
            parts.append((q_g.T @ w @ q_a).flatten(1))
            start += size
        return torch.cat(parts, dim=1)

    np.testing.assert_allclose(inf.gradients("val").numpy(), rotate(q).numpy(), rtol=1e-5,
                               atol=1e-6 * float(q.abs().max()))
    lam = 0.1 * influence.mean_eigenvalue(ctx, "ekfac")
    w = 1.0 / (inf.eigenvalues("ekfac") + lam)
    np.testing.assert_allclose(influence.scores(ctx, "val", lam, "ekfac"),
                               ((rotate(q) * w) @ rotate(g).T).numpy(), rtol=1e-4)
    # another batch size, another directory: the same factors and scores
    other = _context(replace(ctx.cfg, influence=replace(ctx.cfg.influence, batch_size=3)),
                     ctx.train, ctx.sets, root, placement=F64)
    other.feature_dir = lambda m, s, f: tmp_path / m / s / f
    np.testing.assert_allclose(influence.scores(other, "val", lam, "ekfac"),
                               influence.scores(ctx, "val", lam, "ekfac"), rtol=1e-5)


def test_gradients_are_in_kronfluences_layout(unet_world):
    """An example's mean gradient (plain autograd, weights reshaped, bias appended) equals
    kronfluence's per-row gradients of its layers, summed over the rows."""
    ctx, _ = unet_world
    inf = influence.influence(ctx)
    task = influence.DiffusionTask(inf.adapter, ctx.train, ctx, "train", 4, inf.modules)
    mine = inf.mean_gradient(task, 2)
    model, theirs, inputs = inf.adapter.module, {}, {}

    def backward(name, layer, g):
        theirs[name] = layer.compute_per_sample_gradient(inputs[name], g).sum(0) / 4

    def forward(name, layer, args, out):
        inputs[name] = args[0].detach()
        out.register_hook(partial(backward, name, layer))

    hooks = [model.get_submodule(m).register_forward_hook(partial(forward, m))
             for m in inf.modules]
    task.compute_train_loss(torch.arange(8, 12), model).backward()  # rows of example 2
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    assert len(mine) == len(inf.modules) == len(theirs)
    for m, g in zip(inf.modules, mine, strict=True):
        np.testing.assert_allclose(g.numpy(), theirs[m].numpy(), rtol=1e-9, atol=1e-12)


def test_factors_are_reused_and_a_damaged_file_is_refused(unet_world, monkeypatch):
    ctx, root = unet_world
    influence.scores(ctx, "val", None, "ekfac")
    folder = influence.influence_dir(ctx)
    files = sorted(folder.glob("*.safetensors"))
    assert [f.name for f in files] == ["covariance.safetensors", "eigen.safetensors",
                                       "ekfac.safetensors"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    before = influence.scores(ctx, "val", None, "ekfac")

    def refit(*_):
        raise AssertionError("factors fitted again")

    for name in ("_fit_covariance", "_eigendecomposition", "_fit_ekfac"):
        monkeypatch.setattr(influence.Influence, name, refit)
    fresh = _context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64)
    np.testing.assert_array_equal(influence.scores(fresh, "val", None, "ekfac"), before)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    # a row of the rotated gradients lost (killed run): only it is recomputed
    done = np.load(folder / "grads-train-d4" / "done.npy", mmap_mode="r+")
    done[3] = 0
    done.flush()
    monkeypatch.undo()
    again = _context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64)
    np.testing.assert_allclose(influence.scores(again, "val", None, "ekfac"), before, rtol=1e-6)
    # damaged files: a flipped byte in the tensors, a truncated file
    path = folder / "eigen.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArtefactError, match=r"eigen\.safetensors is damaged.*delete it"):
        influence.influence(_context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64))
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DamagedArtefactError, match=r"eigen\.safetensors is damaged.*delete it"):
        influence.influence(_context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64))
    path.unlink()  # deleted, as the message says: recomputed, the same
    fixed = _context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64)
    np.testing.assert_allclose(influence.scores(fixed, "val", None, "ekfac"), before, rtol=1e-6)
    # factors of another model are refused, naming the folder to delete
    save_unet(build_unet(ctx.cfg.model, 1, 8, seed=1), root / "other" / "unet")
    moved = _context(ctx.cfg, ctx.train, ctx.sets, root, placement=F64)
    moved.full_model_dir = root / "other" / "unet"
    with pytest.raises(ValueError, match=r"made from something else \(model differ"):
        influence.influence(moved)


def test_class_conditional_unet(tmp_path):
    """Conditioning goes through adapter.predict; the class embedding is not a tracked layer."""
    cfg = _cfg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**unet_kwargs(cfg.model, 1, 8), num_class_embeds=2)
    save_unet(unet, tmp_path / "model" / "unet")
    train = LabelledImages(_images(0, 6), torch.tensor([0, 1, 0, 1, 0, 1]))
    val = LabelledImages(_images(1, 3), torch.tensor([1, 0, 1]))
    ctx = _context(cfg, train, {"val": val}, tmp_path)
    s = get_method("kfac-if").score(ctx, "val", None)
    assert s.shape == (3, 6) and np.isfinite(s).all()
    assert "class_embedding" not in influence.influence(ctx).modules
    # the labels matter: other labels, other scores
    flipped = _context(cfg, train, {"val": LabelledImages(val.images, 1 - val.labels)},
                       tmp_path / "flipped")
    flipped.full_model_dir = ctx.full_model_dir
    assert not np.allclose(get_method("kfac-if").score(flipped, "val", None), s)


# ----------------------------------------------------------------------------- end to end


def test_registered_and_evaluated_by_the_lds_stage(tmp_path):
    assert METHODS["ekfac-if"] is get_method("ekfac-if") and get_method("kfac-if").uses_lambda
    cfg = preset("tiny")
    cfg = replace(
        cfg, train=replace(cfg.train, steps=10),
        attribution=replace(cfg.attribution, targets=("val",), n_targets=6,
                            methods=("ekfac-if", "trak")),
        lds=replace(cfg.lds, n_subsets=3, eval_timesteps=3, n_boot=20),
        influence=replace(cfg.influence, factor_draws=2, train_draws=4, target_draws=4),
        runtime=replace(cfg.runtime, threads=1))
    run = pipeline.open_run(tmp_path / "run", cfg, progress=False)
    pipeline.run_stages(run, ("data", "train", "lds"))
    records = json.loads((tmp_path / "run" / "results" / "lds.json").read_text())["records"]
    mine = [r for r in records if r["method"] == "ekfac-if"]
    assert {r["lambda_selection"] for r in mine} == {"paper", "heldout"}
    assert all(np.isfinite(r["lds"]) and r["lambda_rel"] > 0 for r in mine)
    ctx = run.context
    t0 = time.time()
    s = get_method("ekfac-if").score(ctx, "val", None)
    assert s.shape == (len(ctx.examples("val")), 64) and np.isfinite(s).all()
    assert time.time() - t0 < 5  # factors and gradients were kept
    # the sign: a target that is a copy of training image i is helped most by i (positive,
    # among the largest scores of its row), as a duplicate is by trak's convention
    dup = replace(ctx, sets={"dup": ctx.train[:8]}, _features={}, _solvers={})
    for name in ("ekfac-if", "kfac-if"):
        d = get_method(name).score(dup, "dup", None)
        self_scores = np.diag(d[:, :8])
        assert (self_scores > 0).all()
        assert (self_scores > np.median(d, axis=1)).all()
    trak = get_method("trak").score(ctx, "val", 0.1 * ctx.solver("loss").trace_scale)
    rho = np.mean([spearmanr(a, b).statistic for a, b in zip(s, trak, strict=True)])
    print(f"ekfac-if vs trak on the tiny run (10 steps, 4 draws, K = 3): Spearman {rho:.3f} "
          "per target")
