"""The hook engine against the vmap reference (float64 oracle), and the factored projector."""

import copy
import logging
import math

import pytest
import torch
from diffusers import UNet2DModel
from peft import LoraConfig, inject_adapter_in_model

from dtrak.config import GRADIENT_ENGINES, PROJECTORS, ConfigError, apply_overrides, preset
from dtrak.families import UNet2DAdapter
from dtrak.families.unet2d import build_unet
from dtrak.featurize import FeatureSpec, featurize_into, featurize_many, projector_for
from dtrak.gradients import param_order, per_sample_gradients, per_sample_gradients_multi
from dtrak.hooks import (
    HookedLayer,
    _groupnorm,
    group_stats,
    hook_gradients,
    hook_plan,
    kron_layers,
)
from dtrak.noise import ScheduleConstants, timesteps
from dtrak.projection import PROJECTOR_KINDS, KronLayer, KronProjector, make_projector
from dtrak.seeding import seed_from

torch.set_num_threads(1)

SCHED = ScheduleConstants.linear()
TS = timesteps("uniform", 3)
IDS = [4, 0, 9]
OUTPUTS = ["loss", "elbo", "square", "avg", "l1", "l2", "linf"]
TIGHT = dict(rtol=1e-8, atol=1e-12)


def tiny_unet(**extra) -> UNet2DModel:
    """A ~45K-parameter UNet with one attention level (down and up), float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=8, **extra,
        ).double().eval()


@pytest.fixture(scope="module")
def unet64():
    return tiny_unet()


@pytest.fixture(scope="module")
def x0():
    return torch.rand(len(IDS), 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def lora_unet() -> UNet2DModel:
    """The tiny UNet with peft LoRA adapters on attention and a conv; only they train."""
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0", "conv_out"]),
        tiny_unet())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:  # peft starts B at zero (a zero gradient for A): make it random
                p.data.normal_(0, 0.1)
    return model.double().eval()


class Gained(torch.nn.Module):
    """A UNet times a bare scalar parameter: one parameter no hook covers."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.gain = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x, t, return_dict=False, **kw):
        return (self.gain * self.unet(x, t, return_dict=False, **kw)[0],)


# --- the hook engine ------------------------------------------------------------------------


def test_hooks_equal_vmap_for_all_outputs(unet64, x0):
    """Float64 oracle: every output function, the UNet with attention, all parameters."""
    a = UNet2DAdapter(unet64)
    layers, uncovered = hook_plan(unet64, param_order(unet64))
    assert not uncovered and {h.kind for h in layers} == {"linear", "conv2d", "groupnorm"}
    ref = per_sample_gradients_multi(a, x0, IDS, OUTPUTS, TS, SCHED, noise_seed=3)
    got = hook_gradients(a, x0, IDS, OUTPUTS, TS, SCHED, noise_seed=3)
    assert got.shape == ref.shape and got.dtype == torch.float64
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, **TIGHT)
    # into a caller's buffer (what featurization reuses block after block): the same values
    buf = torch.full_like(got, float("nan"))
    again = hook_gradients(a, x0, IDS, OUTPUTS, TS, SCHED, noise_seed=3, out=buf)
    assert again.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, ref, **TIGHT)
    with pytest.raises(ValueError, match="out must be"):
        hook_gradients(a, x0, IDS, OUTPUTS, TS, SCHED, noise_seed=3, out=buf[:, :1])


def test_hooks_per_timestep_x0_and_parameter_subset(unet64, x0):
    a = UNet2DAdapter(unet64)
    per_t = torch.rand(len(IDS), len(TS), 1, 8, 8, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64) * 2 - 1
    names = [n for n, _ in unet64.named_parameters() if "attentions" in n or "conv_in" in n][:9]
    ref = per_sample_gradients(a, per_t, IDS, "square", TS, SCHED, 1, param_names=names)
    got = hook_gradients(a, per_t, IDS, ["square"], TS, SCHED, 1, param_names=names)[0]
    torch.testing.assert_close(got, ref, **TIGHT)


def test_hooks_weight_or_bias_alone(unet64, x0):
    """A layer with only its bias (or only its weight) attributed: conv and GroupNorm."""
    a = UNet2DAdapter(unet64)
    names = ["conv_in.bias", "down_blocks.0.resnets.0.norm1.weight",
             "down_blocks.0.resnets.0.norm2.bias", "conv_out.weight"]
    ref = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 2, param_names=names)
    got = hook_gradients(a, x0, IDS, ["square"], TS, SCHED, 2, param_names=names)[0]
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, **TIGHT)


def test_groupnorm_contribution_with_and_without_forward_statistics():
    """The GroupNorm contribution from the forward's saved statistics and from statistics
    computed again: both equal sum_s dy_s xhat_s and sum_s dy_s per example."""
    B, K = 3, 2
    gn = torch.nn.GroupNorm(2, 4).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(K * B, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(K * B, 4, 3, 3, generator=gen, dtype=torch.float64)
    y = gn(x)
    state = group_stats(y)
    assert state is not None and group_stats(y.view_as(y)) is None
    xhat = torch.nn.functional.group_norm(x.detach(), 2, eps=gn.eps)
    ref_w = (dy * xhat).reshape(K, B, 4, -1).sum((0, 3))
    ref_b = dy.reshape(K, B, 4, -1).sum((0, 3))
    h = HookedLayer("gn", "groupnorm", "weight", "bias")
    for s in (state, None):
        got = _groupnorm(gn, h, x.detach(), dy, B, s)
        torch.testing.assert_close(got["weight"], ref_w, **TIGHT)
        torch.testing.assert_close(got["bias"], ref_b, **TIGHT)


def test_hooks_class_conditional_unet(x0):
    """The class embedding is an nn.Embedding: covered too."""
    model = tiny_unet(num_class_embeds=3)
    a = UNet2DAdapter(model)
    assert "embedding" in {h.kind for h in hook_plan(model, param_order(model))[0]}
    cond = {"class_labels": torch.tensor([2, 0, 2])}
    ref = per_sample_gradients_multi(a, x0, IDS, ["loss", "l2"], TS, SCHED, 0, cond=cond)
    got = hook_gradients(a, x0, IDS, ["loss", "l2"], TS, SCHED, 0, cond=cond)
    torch.testing.assert_close(got, ref, **TIGHT)


def test_hooks_peft_lora_layers(x0):
    """LoRA: the base layers are frozen, lora_A / lora_B are Linear (and Conv2d) modules."""
    model = lora_unet()
    a = UNet2DAdapter(model)
    order = param_order(model)
    assert order and all("lora_" in n for n, _ in order)
    layers, uncovered = hook_plan(model, order)
    assert not uncovered and {h.kind for h in layers} == {"linear", "conv2d"}
    ref = per_sample_gradients_multi(a, x0, IDS, ["square", "linf"], TS, SCHED, 2)
    got = hook_gradients(a, x0, IDS, ["square", "linf"], TS, SCHED, 2)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, **TIGHT)


def test_uncovered_parameters_come_from_the_reference(unet64, x0, caplog):
    model = Gained(copy.deepcopy(unet64))
    a = UNet2DAdapter(model)
    assert hook_plan(model, param_order(model))[1] == ["gain"]
    ref = per_sample_gradients_multi(a, x0, IDS, ["loss"], TS, SCHED, 0)
    with caplog.at_level(logging.WARNING, logger="dtrak.hooks"):
        got = hook_gradients(a, x0, IDS, ["loss"], TS, SCHED, 0)
    assert "gain" in caplog.text and "vmap" in caplog.text
    assert ref[0, :, 0].abs().min() > 0  # gain is first in the layout
    torch.testing.assert_close(got, ref, **TIGHT)


def test_hooks_leave_the_model_as_it_was(unet64, x0):
    model = copy.deepcopy(unet64).train()
    hook_gradients(UNet2DAdapter(model), x0, IDS, ["loss"], TS, SCHED, 0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


# --- featurization --------------------------------------------------------------------------


def test_featurize_engines_agree_and_share_a_store(tmp_path):
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    a = UNet2DAdapter(model)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(output="square", n_timesteps=2, projector="gaussian", proj_dim=16)
    kw = dict(batch_size=2, progress=False)
    vm = featurize_into(a, x, tmp_path / "v", spec, SCHED, "m", "train", **kw).load()
    hk = featurize_into(a, x, tmp_path / "h", spec, SCHED, "m", "train", gradients="hooks",
                        **kw)
    torch.testing.assert_close(torch.as_tensor(hk.load()), torch.as_tensor(vm), rtol=1e-4,
                               atol=1e-5)
    # the engine is not in the metadata: a vmap store is completed by the hook engine
    assert (tmp_path / "v" / "meta.json").read_text() == (tmp_path / "h" / "meta.json"
                                                          ).read_text()
    many = featurize_many(a, x, {"square": tmp_path / "m"}, spec, SCHED, "m", "train",
                          gradients="hooks", **kw)
    torch.testing.assert_close(torch.as_tensor(many["square"].load()), torch.as_tensor(vm),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown gradient engine"):
        featurize_into(a, x, tmp_path / "x", spec, SCHED, "m", "train", gradients="loop",
                       **kw)


def test_featurize_kron_store_and_refusals(tmp_path):
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    a = UNet2DAdapter(model)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(output="loss", n_timesteps=2, projector="kron", proj_dim=256)
    with pytest.raises(ValueError, match="gradients='hooks'"):
        featurize_into(a, x, tmp_path / "v", spec, SCHED, "m", "train", progress=False)
    store = featurize_into(a, x, tmp_path / "k", spec, SCHED, "m", "train", batch_size=3,
                           progress=False, gradients="hooks")
    proj = projector_for(spec, sum(n for _, n in param_order(model)), "m", model)
    feats = store.load()
    assert feats.shape == (4, proj.k) and store.k == proj.k != 256
    assert abs(proj.k - 256) < 64
    # equal to the projection of the materialised gradients (the same noise)
    g = per_sample_gradients(a, x, torch.arange(4), "loss", spec.timesteps(1000), SCHED,
                             _set_noise("train"))
    torch.testing.assert_close(torch.as_tensor(feats), proj.project(g), rtol=1e-4, atol=1e-5)


def _set_noise(set_name: str) -> int:
    return seed_from(0, "set", set_name) % (2**62)


def test_config_keys():
    assert PROJECTORS == PROJECTOR_KINDS and GRADIENT_ENGINES == ("vmap", "hooks")
    cfg = apply_overrides(preset("tiny"), ["attribution.gradients=hooks",
                                           "attribution.projector=kron"])
    assert cfg.attribution.gradients == "hooks"
    with pytest.raises(ConfigError, match="attribution.gradients = 'hooks'"):
        apply_overrides(preset("tiny"), ["attribution.projector=kron"])
    with pytest.raises(ConfigError, match="attribution.gradients"):
        apply_overrides(preset("tiny"), ["attribution.gradients=loop"])
    with pytest.raises(ConfigError, match="attribution.projector"):
        apply_overrides(preset("tiny"), ["attribution.projector=fjlt"])


# --- the factored projector -----------------------------------------------------------------


def test_kron_features_equal_the_explicit_kronecker_map(unet64, x0):
    """Hook features == (A_out (x) A_in) applied to each layer's exact gradient [out, in+1]."""
    a = UNet2DAdapter(unet64)
    order = param_order(unet64)
    layers = kron_layers(unet64, order)
    proj = KronProjector(sum(n for _, n in order), 512, seed=3, model_id=1, order=order,
                         layers=layers)
    assert {(layer.bias is None) for layer in layers} == {False}  # every bias is a column
    g = per_sample_gradients(a, x0, IDS, "square", TS, SCHED, 5)  # float64, materialised
    feats = hook_gradients(a, x0, IDS, ["square"], TS, SCHED, 5, projector=proj)[0]
    assert feats.shape == (3, proj.k) and feats.dtype == torch.float32
    at = 0
    for layer, (a_out, a_in), (ko, ki) in zip(layers, proj.factors, proj.dims, strict=True):
        G = proj.columns(g, layer.weight).reshape(3, layer.d_out, layer.d_in)
        G = torch.cat([G, proj.columns(g, layer.bias).unsqueeze(2)], dim=2)
        explicit = G.reshape(3, -1) @ torch.kron(a_out, a_in).double().T
        torch.testing.assert_close(feats[:, at : at + ko * ki].double(), explicit,
                                   rtol=1e-5, atol=1e-6)
        at += ko * ki
    rest = torch.cat([proj.columns(g, n) for n in proj.rest_names], dim=1)
    torch.testing.assert_close(feats[:, at:].double(),
                               rest @ proj.rest.matrix().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, proj.project(g), rtol=1e-5, atol=1e-6)


def test_kron_lora_and_conditional_features_match_the_materialised_map(x0):
    for model, cond in ((lora_unet(), None),
                        (tiny_unet(num_class_embeds=3), {"class_labels": torch.tensor([1, 0, 2])})):
        a = UNet2DAdapter(model)
        order = param_order(model)
        proj = KronProjector(sum(n for _, n in order), 128, order=order,
                             layers=kron_layers(model, order))
        g = per_sample_gradients(a, x0, IDS, "l1", TS, SCHED, 0, cond=cond)
        feats = hook_gradients(a, x0, IDS, ["l1"], TS, SCHED, 0, cond=cond, projector=proj)[0]
        torch.testing.assert_close(feats, proj.project(g), rtol=1e-5, atol=1e-6)


LAYOUT = [("a.weight", 12 * 7), ("a.bias", 12), ("n.weight", 5), ("c.weight", 6 * 3 * 3 * 3),
          ("c.bias", 6), ("d.weight", 9 * 4)]
LAYERS = [KronLayer("a.weight", "a.bias", 12, 7), KronLayer("c.weight", "c.bias", 6, 27),
          KronLayer("d.weight", None, 9, 4)]
P_LAYOUT = sum(n for _, n in LAYOUT)


def _kron(k, seed, entries="gaussian"):
    return make_projector("kron", P_LAYOUT, k, seed=seed, model_id=0, order=LAYOUT,
                          layers=LAYERS, entries=entries)


@pytest.mark.parametrize("entries", ["gaussian", "rademacher"])
def test_kron_inner_products_are_unbiased(entries):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, P_LAYOUT, generator=gen, dtype=torch.float64)
    g[1] = 0.6 * g[0] + 0.8 * g[1]  # correlated, so the target is far from 0
    exact = float(g[0] @ g[1])
    n = 600
    ips = torch.tensor([float((lambda f: f[0] @ f[1])(_kron(24, s, entries).project(g).double()))
                        for s in range(n)])
    stderr = float(ips.std()) / math.sqrt(n)
    assert abs(float(ips.mean()) - exact) < 4 * stderr
    assert stderr < 0.1 * abs(exact)  # the test has power


def test_kron_gram_error_decays_with_k():
    g = torch.randn(8, P_LAYOUT, generator=torch.Generator().manual_seed(1))
    gram = g @ g.T

    def err(k):
        return sum(float((lambda f: (f @ f.T - gram).norm() / gram.norm())(
            _kron(k, s).project(g))) for s in range(20)) / 20

    e = [err(k) for k in (16, 64, 256)]
    assert e[0] > e[1] > e[2]
    assert e[2] < e[0] / 2


def test_kron_dims_seeds_and_errors():
    p = _kron(64, 0)
    assert p.k == sum(ko * ki for ko, ki in p.dims) + p.rest.k and abs(p.k - 64) <= 16
    assert all(ko <= layer.d_out and ki <= layer.d_in_aug
               for layer, (ko, ki) in zip(LAYERS, p.dims, strict=True))
    assert p.rest_names == ["n.weight"]
    d = p.describe()
    assert d["kind"] == "kron" and d["k"] == p.k and d["proj_dim"] == 64
    g = torch.randn(3, P_LAYOUT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_kron(64, 0).project(g), p.project(g))  # seeded
    assert not torch.allclose(_kron(64, 1).project(g), p.project(g))
    torch.testing.assert_close(p.project(g), g @ p.matrix(), rtol=1e-4, atol=1e-5)  # linear
    with pytest.raises(ValueError, match="attribution.gradients = 'hooks'"):
        make_projector("kron", P_LAYOUT, 64)
    with pytest.raises(ValueError, match="gradient entries"):
        make_projector("kron", P_LAYOUT + 1, 64, order=LAYOUT, layers=LAYERS)
