"""Feature store and featurization: resume, shards, batch invariance, refusal to mix."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import dtrak.featurize as featurize_mod
from dtrak.config import ModelConfig, preset
from dtrak.families import UNet2DAdapter
from dtrak.families.unet2d import build_scheduler, build_unet
from dtrak.featurize import FeatureSpec, featurize_into, featurize_many
from dtrak.noise import ScheduleConstants
from dtrak.store import FeatureStore, StoreMismatchError, parse_shard

SPEC = FeatureSpec(output="square", n_timesteps=2, projector="gaussian", proj_dim=16)


@pytest.fixture(scope="module")
def setup():
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    sched = ScheduleConstants.from_scheduler(build_scheduler(ModelConfig()))
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return UNet2DAdapter(model), sched, x


def _run(setup, path, **kw):
    adapter, sched, x = setup
    return featurize_into(adapter, x, path, kw.pop("spec", SPEC), sched, "m", "train",
                          progress=False, **kw)


def test_batch_size_and_shards_give_identical_features(setup, tmp_path):
    a = _run(setup, tmp_path / "a", batch_size=10).load()
    b = _run(setup, tmp_path / "b", batch_size=3).load()
    # the noise and projection are exactly the same; batched float32 kernels round
    # differently for different batch shapes, so equality is up to that rounding
    tol = 1e-4 * np.abs(a).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    for i in range(3):  # three shard workers on one store
        _run(setup, tmp_path / "c", batch_size=2, shard=(i, 3))
    c = FeatureStore.open(tmp_path / "c")
    assert c.complete
    np.testing.assert_allclose(a, c.load(), rtol=0, atol=tol)
    # an example is always computed in the same fixed block: sharding changes nothing
    np.testing.assert_array_equal(c.load(), _run(setup, tmp_path / "e", batch_size=2).load())
    # the same batch layout is bit-identical
    np.testing.assert_array_equal(b, _run(setup, tmp_path / "d", batch_size=3).load())


def test_todo_blocks_are_fixed_blocks_of_the_whole_set(setup, tmp_path):
    store = _run(setup, tmp_path / "s", batch_size=4)
    store.done[[1, 9]] = 0
    blocks = featurize_mod.todo_blocks([store], 4)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [8, 9]]
    assert [b.tolist() for b in featurize_mod.todo_blocks([store], 4, (1, 2))] == []
    assert [b.tolist() for b in featurize_mod.todo_blocks([store], 4, (0, 2))] == [
        [0, 1, 2, 3], [8, 9]]


def test_a_damaged_row_is_recomputed_bit_for_bit(setup, tmp_path):
    full = _run(setup, tmp_path / "full", batch_size=4).load()
    store = _run(setup, tmp_path / "s", batch_size=4)
    store.features[5] = 0.0  # lost rows of a batch: the done flags cleared
    store.done[5] = 0
    store.features.flush()
    store.done.flush()
    np.testing.assert_array_equal(_run(setup, tmp_path / "s", batch_size=4).load(), full)


def test_featurize_many_killed_between_stores_resumes_bit_for_bit(setup, tmp_path,
                                                                   monkeypatch):
    adapter, sched, x = setup
    outs = ["loss", "square", "l2"]

    def many(root):
        return featurize_many(adapter, x, {o: root / o for o in outs}, SPEC, sched, "m",
                              "train", batch_size=4, progress=False)

    full = {o: st.load() for o, st in many(tmp_path / "full").items()}
    real, writes = FeatureStore.write, {"n": 0}

    def dying(self, ids, values):
        writes["n"] += 1
        if writes["n"] == 5:  # second batch: "loss" written, "square" and "l2" not
            raise KeyboardInterrupt("killed")
        return real(self, ids, values)

    monkeypatch.setattr(FeatureStore, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        many(tmp_path / "killed")
    monkeypatch.setattr(FeatureStore, "write", real)
    assert FeatureStore.open(tmp_path / "killed" / "loss").done.sum() == 8
    assert FeatureStore.open(tmp_path / "killed" / "square").done.sum() == 4
    resumed = many(tmp_path / "killed")
    for o in outs:
        np.testing.assert_array_equal(resumed[o].load(), full[o])


def test_resume_after_kill_is_bit_identical(setup, tmp_path, monkeypatch):
    full = _run(setup, tmp_path / "full", batch_size=4).load()
    real = featurize_mod.per_sample_gradients
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(featurize_mod, "per_sample_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "killed", batch_size=4)
    store = FeatureStore.open(tmp_path / "killed")
    assert store.done.sum() == 4 and not store.complete
    with pytest.raises(ValueError, match="incomplete"):
        store.load()
    monkeypatch.setattr(featurize_mod, "per_sample_gradients", real)
    resumed = _run(setup, tmp_path / "killed", batch_size=4).load()
    np.testing.assert_array_equal(full, resumed)


def test_store_refuses_other_settings(setup, tmp_path):
    _run(setup, tmp_path / "s", batch_size=10)
    other = FeatureSpec(output="loss", n_timesteps=2, projector="gaussian", proj_dim=16)
    with pytest.raises(StoreMismatchError, match="other settings"):
        _run(setup, tmp_path / "s", spec=other)
    # --overwrite recomputes
    _run(setup, tmp_path / "s", spec=other, overwrite=True)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_non_finite_gradients_name_the_example(setup, tmp_path):
    adapter, sched, x = setup
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="3"):
        featurize_into(adapter, bad, tmp_path / "nan", SPEC, sched, "m", "train",
                       batch_size=2, progress=False)
    # what was computed before the bad batch is kept
    assert FeatureStore.open(tmp_path / "nan").done.sum() == 2


def test_featurize_many_equals_one_output_at_a_time_and_completes_stores(setup, tmp_path):
    adapter, sched, x = setup
    outs = ["loss", "square", "l2"]
    single = {o: _run(setup, tmp_path / f"one-{o}", spec=replace(SPEC, output=o),
                      batch_size=4).load() for o in outs}
    # a store already half written one output at a time is completed, its rows kept
    part = tmp_path / "many-square"
    _run(setup, part, spec=replace(SPEC, output="square"), batch_size=4)
    st = FeatureStore.open(part)
    kept = np.array(st.features[:5])
    st.done[5:] = 0
    st.done.flush()
    stores = featurize_many(adapter, x, {o: tmp_path / f"many-{o}" for o in outs}, SPEC, sched,
                            "m", "train", batch_size=4, progress=False)
    for o in outs:
        got = stores[o].load()
        np.testing.assert_allclose(got, single[o], rtol=0, atol=1e-4 * np.abs(single[o]).max())
        # the same store as featurize_into's: reopening it with that spec is accepted
        assert _run(setup, tmp_path / f"many-{o}", spec=replace(SPEC, output=o)).complete
    np.testing.assert_array_equal(stores["square"].load()[:5], kept)
