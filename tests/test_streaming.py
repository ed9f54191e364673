"""Sharded store and streamed kernel: oracles against the in-memory KernelSolver."""

import numpy as np
import pytest

import dtrak.streaming as streaming
from dtrak.artefacts import create_npy
from dtrak.scoring import KernelSolver
from dtrak.store import FeatureStore, ShardedStore, StoreMismatchError, open_store
from dtrak.streaming import StreamingKernel, accumulate_gram, stream_scores, top_from_scores

META = {"model": "m", "output": "square"}


def _features(n=53, k=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * np.linspace(0.2, 3, k)).astype(np.float32)


def _sharded(tmp_path, phi, shard_rows=16, name="s", meta=META):
    store = ShardedStore(tmp_path / name, len(phi), phi.shape[1], meta, shard_rows)
    for i in range(store.n_shards):  # one worker per shard, each writing local rows
        start, stop = store.rows(i)
        store.shard(i).write(np.arange(stop - start), phi[start:stop])
    return store


def _flat(tmp_path, phi, name="f"):
    store = FeatureStore(tmp_path / name, len(phi), phi.shape[1], META)
    store.write(np.arange(len(phi)), phi)
    return store


# ------------------------------------------------------------------ sharded store
def test_sharded_store_fills_shard_by_shard_and_reads_blocks(tmp_path):
    phi = _features()
    store = ShardedStore(tmp_path / "s", 53, 6, META, shard_rows=16)
    assert store.n_shards == 4 and store.rows(3) == (48, 53)
    assert not store.complete and len(store.missing()) == 53
    with pytest.raises(ValueError, match="incomplete"):
        next(store.blocks(8))
    store.write(np.arange(0, 20), phi[:20])  # global ids across two shards
    np.testing.assert_array_equal(store.missing(), np.arange(20, 53))
    for i in (2, 3):
        start, stop = store.rows(i)
        store.shard(i).write(np.arange(stop - start), phi[start:stop])
    store.write(np.arange(20, 32), phi[20:32])
    assert store.complete
    again = open_store(tmp_path / "s")
    assert isinstance(again, ShardedStore)
    np.testing.assert_array_equal(again.load(), phi)
    blocks = list(again.blocks(7))
    assert all(stop - start <= 7 for start, stop, _ in blocks)
    assert [b[0] for b in blocks][:4] == [0, 7, 14, 16]  # blocks never cross a shard
    np.testing.assert_array_equal(np.concatenate([b for *_, b in blocks]), phi)
    resumed = list(again.blocks(7, start=21))
    assert resumed[0][:2] == (21, 23) and resumed[-1][1] == 53


def test_sharded_store_refuses_other_settings(tmp_path):
    ShardedStore(tmp_path / "s", 10, 4, META, shard_rows=4)
    with pytest.raises(StoreMismatchError, match="shard_rows"):
        ShardedStore(tmp_path / "s", 10, 4, META, shard_rows=5)
    with pytest.raises(StoreMismatchError, match="model"):
        ShardedStore(tmp_path / "s", 10, 4, {**META, "model": "other"}, shard_rows=4)
    store = ShardedStore.open(tmp_path / "s")
    assert store.shard_rows == 4
    FeatureStore(tmp_path / "f", 3, 4, META)
    assert isinstance(open_store(tmp_path / "f"), FeatureStore)
    with pytest.raises(ValueError, match="without shards"):
        ShardedStore.open(tmp_path / "f")


def test_flat_store_blocks_equal_its_features(tmp_path):
    phi = _features(n=20)
    store = _flat(tmp_path, phi)
    got = list(store.blocks(6))
    assert [(a, b) for a, b, _ in got] == [(0, 6), (6, 12), (12, 18), (18, 20)]
    np.testing.assert_array_equal(np.concatenate([b for *_, b in got]), phi)
    assert [(a, b) for a, b, _ in store.blocks(6, start=8)] == [(8, 12), (12, 18), (18, 20)]


# ------------------------------------------------------------------ streamed kernel
@pytest.mark.parametrize("kind", ["flat", "sharded"])
def test_streamed_factorisation_and_scores_equal_the_in_memory_solver(tmp_path, kind):
    phi, targets = _features(), _features(n=5, seed=1)
    store = _flat(tmp_path, phi) if kind == "flat" else _sharded(tmp_path, phi)
    gram = accumulate_gram(store, block_rows=7)
    np.testing.assert_allclose(gram, phi.astype(np.float64).T @ phi, rtol=1e-12, atol=1e-10)
    kernel = StreamingKernel.prepare(store, tmp_path / "kernel", block_rows=7)
    oracle = KernelSolver(phi, form="primal")
    np.testing.assert_allclose(kernel.eigenvalues, oracle.eigenvalues, rtol=1e-10)
    assert kernel.trace_scale == pytest.approx(oracle.trace_scale, rel=1e-12)
    lam = 0.1 * oracle.trace_scale
    expected = oracle.scores(targets, lam)
    out = np.empty_like(expected)
    top = stream_scores(kernel, store, targets, lam, top=10, out=out, block_rows=7)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # exact top-m equals the sort of the in-memory scores (random data: no ties)
    np.testing.assert_array_equal(top.proponents, np.argsort(-expected, axis=1)[:, :10])
    np.testing.assert_array_equal(top.opponents, np.argsort(expected, axis=1)[:, :10])
    ref = top_from_scores(expected, 10)
    np.testing.assert_allclose(top.proponent_scores, ref.proponent_scores, rtol=1e-5)
    np.testing.assert_allclose(top.opponent_scores, ref.opponent_scores, rtol=1e-5)
    # the factorisation is cached: a second prepare reads it back
    again = StreamingKernel.prepare(store, tmp_path / "kernel")
    np.testing.assert_array_equal(again.eigenvectors, kernel.eigenvectors)
    assert again.trace_scale == kernel.trace_scale


def test_scores_go_to_a_memmap_and_top_is_optional(tmp_path):
    phi, targets = _features(), _features(n=3, seed=2)
    store = _sharded(tmp_path, phi)
    kernel = StreamingKernel.prepare(store, tmp_path / "k")
    out = create_npy(tmp_path / "scores.npy", (3, 53), np.float32)
    assert stream_scores(kernel, store, targets, 1.0, out=out) is None
    out.flush()
    expected = KernelSolver(phi, form="primal").scores(targets, 1.0)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    top = stream_scores(kernel, store, targets, 1.0, top=100)  # m > N: all of them
    assert top.proponents.shape == (3, 53)
    with pytest.raises(ValueError, match="lambda = 0"):
        StreamingKernel.prepare(_flat(tmp_path, _features(n=3)), tmp_path / "k3").query(
            targets, 0.0)


def test_top_keeps_ties_by_the_lower_id():
    scores = np.array([[1, 3, 3, 0, 3, 2, 1]], dtype=np.float32)
    largest = streaming._Largest(1, 3)
    for start in range(0, 7, 2):
        largest.update(start, scores[:, start:start + 2])
    np.testing.assert_array_equal(largest.ids, [[1, 2, 4]])
    np.testing.assert_array_equal(top_from_scores(scores, 3).proponents, [[1, 2, 4]])
    np.testing.assert_array_equal(top_from_scores(scores, 2).opponents, [[3, 0]])


def test_a_killed_accumulation_resumes_to_the_same_gram(tmp_path, monkeypatch):
    phi = _features(n=200, k=5)
    store = _sharded(tmp_path, phi, shard_rows=64)
    whole = accumulate_gram(store, block_rows=8)

    reads = {"left": 11}  # die while reading the 12th block (after the 2nd checkpoint)
    blocks = store.blocks

    def dying(block_rows, start=0):
        for item in blocks(block_rows, start):
            if reads["left"] == 0:
                raise KeyboardInterrupt("killed")
            reads["left"] -= 1
            yield item

    monkeypatch.setattr(store, "blocks", dying)
    with pytest.raises(KeyboardInterrupt):
        StreamingKernel.prepare(store, tmp_path / "k", block_rows=8, checkpoint_every=5)
    progress = streaming._load_json(tmp_path / "k" / "progress.json")
    assert progress["next_row"] == 80  # 10 blocks of 8 rows were saved
    assert [p.name for p in (tmp_path / "k").glob("gram-*.npy")] == [progress["gram"]]
    seen = []

    def watched(block_rows, start=0):
        seen.append(start)
        return blocks(block_rows, start)

    monkeypatch.setattr(store, "blocks", watched)
    resumed = accumulate_gram(store, tmp_path / "k", block_rows=8, checkpoint_every=5)
    assert seen == [80]
    np.testing.assert_array_equal(resumed, whole)  # bit for bit
    # the complete sum is kept until the factorisation is saved: nothing is read again
    np.testing.assert_array_equal(accumulate_gram(store, tmp_path / "k", block_rows=8), whole)
    assert seen == [80, 200]
    kernel = StreamingKernel.prepare(store, tmp_path / "k", block_rows=8)
    assert seen == [80, 200, 200]
    assert not (tmp_path / "k" / "progress.json").exists()
    assert not list((tmp_path / "k").glob("gram-*.npy"))
    oracle = KernelSolver(phi, form="primal")
    np.testing.assert_allclose(kernel.eigenvalues, oracle.eigenvalues, rtol=1e-10)


def test_progress_of_another_store_is_not_used(tmp_path):
    phi = _features(n=40, k=4)
    a = _sharded(tmp_path, phi, name="a")
    b = _sharded(tmp_path, 2 * phi, name="b", meta={**META, "model": "other"})
    (tmp_path / "k").mkdir()
    streaming._save_progress(tmp_path / "k", a, 16, np.full((4, 4), 7.0))
    gram = accumulate_gram(b, tmp_path / "k", block_rows=8)
    np.testing.assert_allclose(gram, 4 * phi.astype(np.float64).T @ phi, rtol=1e-12)


def test_streamed_lds_sweep_equals_the_in_memory_one(tmp_path):
    phi = _features(n=53, k=6)
    rng = np.random.default_rng(3)
    targets = rng.standard_normal((4, 6))
    masks = rng.random((7, 53)) < 0.5
    lams = [0.01, 0.3, 5.0]
    store = _sharded(tmp_path, phi)
    kernel = StreamingKernel.prepare(store, tmp_path / "k", block_rows=8)
    got = streaming.stream_predicted_outputs_sweep(kernel, store, targets, lams, masks,
                                                   block_rows=8)
    want = KernelSolver(phi, form="primal").predicted_outputs_sweep(targets, lams, masks)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
    with pytest.raises(ValueError, match="masks must be bool"):
        streaming.stream_predicted_outputs_sweep(kernel, store, targets, lams, masks[:, :9])
