"""Projectors: fast ones equal their dense matrices, preserve inner products, are deterministic."""

import math

import pytest
import torch

from dtrak.projection import (
    DenseProjector,
    IdentityProjector,
    SJLTProjector,
    SRHTProjector,
    _hadamard,
    fwht,
    make_projector,
)

torch.set_num_threads(1)

P, K = 300, 64  # p not a power of two, not a multiple of the dense block size
KINDS = ["gaussian", "rademacher", "srht", "sjlt"]


def _grads(b=5, p=P, seed=0):
    return torch.randn(b, p, generator=torch.Generator().manual_seed(seed))


def _make(kind, p=P, k=K, model_id=0, **opts):
    if kind in ("gaussian", "rademacher"):
        opts.setdefault("block_size", 128)
    return make_projector(kind, p, k, seed=11, model_id=model_id, **opts)


def test_fwht_equals_hadamard_matmul():
    x = torch.randn(3, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for factor in (2, 4, 32, 256):
        torch.testing.assert_close(fwht(x, factor=factor), x @ _hadamard(256).double())


@pytest.mark.parametrize("kind", KINDS)
def test_project_equals_its_matrix(kind):
    proj = _make(kind)
    m = proj.matrix()
    assert m.shape == (P, K)
    g = _grads()
    out = proj.project(g)
    assert out.dtype == torch.float32 and out.shape == (5, K)
    torch.testing.assert_close(out, g @ m, rtol=1e-4, atol=1e-5)


def test_dense_matrix_entries():
    m = _make("rademacher").matrix()
    assert set(torch.unique(m * math.sqrt(K)).tolist()) == {-1.0, 1.0}
    g = _make("gaussian").matrix() * math.sqrt(K)
    assert abs(g.mean().item()) < 0.02 and abs(g.std().item() - 1) < 0.02


def test_srht_and_sjlt_structure():
    m = _make("srht").matrix() * math.sqrt(K)
    torch.testing.assert_close(m.abs(), torch.ones(P, K))  # +-1/sqrt(k): a signed Hadamard
    s = _make("sjlt", s=4).matrix()
    assert ((s != 0).sum(dim=1) == 4).all()  # s nonzeros per input coordinate
    torch.testing.assert_close(s.square().sum(dim=1), torch.ones(P))


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_inner_products(kind):
    """E[M M^T] = I: averaged over 300 model ids, the Gram of the rows is near identity."""
    p, k, n = 12, 8, 300
    acc = torch.zeros(p, p)
    for i in range(n):
        m = _make(kind, p=p, k=k, model_id=i).matrix()
        acc += m @ m.T
    err = (acc / n - torch.eye(p)).abs().max().item()
    assert err < 0.15, err


@pytest.mark.parametrize("kind", KINDS)
def test_gram_matrix_preserved_for_large_k(kind):
    p, k = 4096, 2048
    g = _grads(8, p)
    proj = make_projector(kind, p, k, seed=0, model_id=0)
    pg = proj.project(g)
    gram, pgram = g @ g.T, pg @ pg.T
    rel = ((pgram - gram).norm() / gram.norm()).item()
    assert rel < 0.1, rel  # about sqrt(2 / k) ~ 0.03 expected
    norms = pg.norm(dim=1) / g.norm(dim=1)
    assert (norms - 1).abs().max() < 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_across_batch_sizes_calls_and_instances(kind):
    g = _grads(7)
    proj = _make(kind)
    full = proj.project(g)
    parts = torch.cat([proj.project(g[:1]), proj.project(g[1:4]), proj.project(g[4:])])
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)  # gemm blocking rounding
    torch.testing.assert_close(_make(kind).project(g), full, rtol=0, atol=0)
    assert not torch.allclose(_make(kind, model_id=1).project(g), full, atol=1e-3)


def test_srht_small_batches_bound_memory_not_results():
    g = _grads(7)
    a = SRHTProjector(P, K, seed=1, batch_size=2).project(g)
    torch.testing.assert_close(a, SRHTProjector(P, K, seed=1, batch_size=16).project(g))


def test_identity_projector_is_exact():
    g = _grads()
    proj = make_projector("none", P, 10)
    assert proj.k == P and torch.equal(proj.project(g), g)
    assert isinstance(proj, IdentityProjector)


def test_describe_and_repr():
    d = _make("gaussian").describe()
    assert d == {"kind": "gaussian", "p": P, "k": K, "seed": 11, "model_id": 0, "block_size": 128}
    assert _make("sjlt", s=2).describe()["s"] == 2
    assert _make("srht").describe()["kind"] == "srht"
    assert "p=300" in repr(_make("srht"))


def test_validation():
    with pytest.raises(ValueError, match="kind='none'"):
        SRHTProjector(10, 20)
    with pytest.raises(ValueError, match="unknown projector kind"):
        make_projector("fjlt", 10, 2)
    with pytest.raises(ValueError, match=r"\[B, p=300\]"):
        _make("srht").project(torch.randn(2, 299))
    with pytest.raises(ValueError, match="s <= k"):
        SJLTProjector(10, 2, s=3)
    with pytest.raises(ValueError, match="gaussian or rademacher"):
        DenseProjector(10, 2, kind="srht")
    with pytest.raises(ValueError, match="small p"):
        _make("srht").matrix(max_p=100)


def test_trak_cuda_is_optional():
    try:
        import trak  # noqa: F401

        has_trak = torch.cuda.is_available()
    except ImportError:
        has_trak = False
    if has_trak:
        pytest.skip("trak with CUDA present; this test checks the error path")
    with pytest.raises(ValueError, match="srht"):
        make_projector("trak-cuda", 1024, 512)
