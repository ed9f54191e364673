"""Featurization into a sharded store (attribution.store_shard_rows): the same features bit for
bit as one file, workers that write their own shard files, resumption, whole runs."""

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dtrak.featurize as featurize_mod
from dtrak import pipeline
from dtrak.cli import main
from dtrak.config import ConfigError, DataConfig, ModelConfig, preset
from dtrak.families import UNet2DAdapter
from dtrak.families.unet2d import build_scheduler, build_unet, save_unet
from dtrak.featurize import FeatureSpec, featurize_into, featurize_many, finished_features
from dtrak.images import save_pngs
from dtrak.noise import ScheduleConstants
from dtrak.stages.featurize import featurize_shard
from dtrak.stages.run import open_run
from dtrak.store import FeatureStore, ShardedStore, open_store

SPEC = FeatureSpec(output="square", n_timesteps=2, projector="gaussian", proj_dim=16)
OUTS = ["loss", "square"]


@pytest.fixture(scope="module")
def setup():
    model = build_unet(preset("tiny").model, 1, 8, seed=0)
    sched = ScheduleConstants.from_scheduler(build_scheduler(ModelConfig()))
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return UNet2DAdapter(model), sched, x


def _into(setup, path, **kw):
    adapter, sched, x = setup
    return featurize_into(adapter, x, path, SPEC, sched, "m", "train", batch_size=2,
                          progress=False, **kw)


def _many(setup, root, **kw):
    adapter, sched, x = setup
    return featurize_many(adapter, x, {o: root / o for o in OUTS}, SPEC, sched, "m", "train",
                          batch_size=2, progress=False, **kw)


def test_a_sharded_store_holds_the_single_stores_features_bit_for_bit(setup, tmp_path):
    adapter, sched, _ = setup
    single = _into(setup, tmp_path / "one")
    sharded = _into(setup, tmp_path / "sharded", shard_rows=4)
    assert isinstance(single, FeatureStore) and isinstance(sharded, ShardedStore)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "meta.json", "shard-00000", "shard-00001", "shard-00002"]  # rows 0:4, 4:8, 8:10
    np.testing.assert_array_equal(sharded.load(), single.load())
    many = _many(setup, tmp_path / "many", shard_rows=4)
    one_many = _many(setup, tmp_path / "one-many")
    for o in OUTS:
        assert isinstance(many[o], ShardedStore)
        np.testing.assert_array_equal(many[o].load(), one_many[o].load())
    # the readers of finished stores take either layout
    assert isinstance(open_store(tmp_path / "sharded"), ShardedStore)
    got = finished_features(adapter, 10, tmp_path / "sharded", SPEC, sched, "m", "train")
    np.testing.assert_array_equal(got, single.load())
    assert finished_features(adapter, 10, tmp_path / "sharded", SPEC, sched, "m", "val") is None


def test_done_rows_and_missing_mask_agree_with_the_shards(tmp_path):
    store = ShardedStore(tmp_path / "s", 10, 3, {"model": "m"}, shard_rows=4)
    assert store.missing_mask().all() and not store.done_rows(np.arange(10)).any()
    store.write(np.array([1, 5, 9]), np.ones((3, 3)))
    expect = np.isin(np.arange(10), [1, 5, 9])
    np.testing.assert_array_equal(store.done_rows(np.arange(10)), expect)
    np.testing.assert_array_equal(store.missing_mask(), ~expect)
    np.testing.assert_array_equal(store.missing(), np.flatnonzero(~expect))
    with pytest.raises(ValueError, match="lie in"):
        store.done_rows(np.array([10]))


def test_workers_take_whole_store_shards_and_write_only_their_files(setup, tmp_path,
                                                                    monkeypatch):
    single = _many(setup, tmp_path / "one")
    stores = _many(setup, tmp_path / "w", shard=(0, 2), shard_rows=4)
    # worker 0 of 2 took store shards 0 and 2 (rows 0:4, 8:10); shard 1 was never made
    assert sorted(p.name for p in (tmp_path / "w" / "loss").iterdir()) == [
        "meta.json", "shard-00000", "shard-00002"]
    assert featurize_mod.todo_blocks(list(stores.values()), 2, (1, 2))[0].tolist() == [4, 5]
    assert [b.tolist() for b in featurize_mod.todo_blocks(list(stores.values()), 2, (0, 2))
            ] == []
    real, written = FeatureStore.write, set()

    def recording(self, ids, values):
        written.add(self.directory.name)
        return real(self, ids, values)

    monkeypatch.setattr(FeatureStore, "write", recording)
    done = _many(setup, tmp_path / "w", shard=(1, 2), shard_rows=4)
    assert written == {"shard-00001"}  # worker 1 touched only its own shard
    for o in OUTS:
        assert done[o].complete
        np.testing.assert_array_equal(done[o].load(), single[o].load())


def test_a_killed_sharded_run_resumes_bit_for_bit(setup, tmp_path, monkeypatch):
    full = _into(setup, tmp_path / "full", shard_rows=4).load()
    real, calls = featurize_mod.per_sample_gradients, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed in shard 1, after its first block
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(featurize_mod, "per_sample_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        _into(setup, tmp_path / "killed", shard_rows=4)
    store = open_store(tmp_path / "killed")
    assert np.flatnonzero(store.missing_mask()).tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="incomplete"):
        store.load()
    monkeypatch.setattr(featurize_mod, "per_sample_gradients", real)
    np.testing.assert_array_equal(_into(setup, tmp_path / "killed", shard_rows=4).load(), full)
    # a store keeps its layout: asking for another one completes it as it is
    again = _into(setup, tmp_path / "killed")
    assert isinstance(again, ShardedStore) and again.shard_rows == 4


def test_store_shard_rows_must_be_a_multiple_of_the_batch_size():
    a = preset("tiny").attribution
    dataclasses.replace(a, batch_size=4, store_shard_rows=12).validate()
    for rows in (6, 0, -4):
        with pytest.raises(ConfigError, match="store_shard_rows: must be a positive multiple "
                                              r"of attribution.batch_size \(4\)"):
            dataclasses.replace(a, batch_size=4, store_shard_rows=rows).validate()


def _tiny(shard_rows=None):
    cfg = preset("tiny")
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=10),
        sampling=dataclasses.replace(cfg.sampling, n_images=4, steps=3),
        attribution=dataclasses.replace(cfg.attribution, n_targets=4, methods=("trak", "dtrak"),
                                        store_shard_rows=shard_rows),
        runtime=dataclasses.replace(cfg.runtime, threads=1))


def test_a_run_with_sharded_stores_scores_as_one_with_single_files(tmp_path):
    plain = pipeline.open_run(tmp_path / "plain", _tiny(), progress=False)
    pipeline.run_stages(plain, ("data", "train", "generate", "featurize", "score"))
    rows = 2 * plain.cfg.attribution.batch_size
    sharded = pipeline.open_run(tmp_path / "sharded", _tiny(rows), progress=False)
    pipeline.run_stages(sharded, ("data", "train", "generate"))
    for i in range(2):  # what `dtrak featurize --shards 2` hands its workers
        featurize_shard(sharded, (i, 2))
    pipeline.run_stages(sharded, ("featurize", "score"))
    train = sharded.paths.features("full", "train", sharded.context.spec("square").name)
    n_shards = -(-sharded.cfg.data.train_size // rows)
    assert n_shards >= 2 and len(list(train.glob("shard-*/features.npy"))) == n_shards
    assert not (train / "features.npy").exists()
    scores = sorted(p.relative_to(tmp_path / "plain")
                    for p in (tmp_path / "plain").glob("scores/*/*.npy"))
    assert scores
    for rel in scores:
        np.testing.assert_array_equal(np.load(tmp_path / "sharded" / rel),
                                      np.load(tmp_path / "plain" / rel), err_msg=str(rel))
    # the key is result-neutral: the plain run reopens with it and keeps its stores' layout
    reopened = pipeline.open_run(tmp_path / "plain", _tiny(rows), progress=False)
    pipeline.run_stages(reopened, ("featurize",))
    kept = reopened.paths.features("full", "train", reopened.context.spec("square").name)
    assert (kept / "features.npy").exists() and not list(kept.glob("shard-*"))


def test_attribute_reads_a_runs_sharded_store(tmp_path):
    cfg = preset("tiny")
    cfg = dataclasses.replace(
        cfg, data=DataConfig(name="digits", resolution=8, train_size=20, val_size=10),
        attribution=dataclasses.replace(cfg.attribution, store_shard_rows=8))
    run = open_run(tmp_path / "run", cfg, progress=False)
    save_unet(build_unet(cfg.model, 1, 8, seed=0), run.paths.model / "unet")
    run.context.features("train", "square")  # the run's own training features, 3 shards
    assert isinstance(open_store(run.paths.features("full", "train",
                                                    run.context.spec("square").name)),
                      ShardedStore)
    save_pngs(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1,
              tmp_path / "t")
    args = ["attribute", "--run", str(tmp_path / "run"), str(tmp_path / "t"), "--top", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--device",
            "cpu", "-q"]
    plain = CliRunner().invoke(main, args)
    stream = CliRunner().invoke(main, [*args, "--stream"])
    assert plain.exit_code == 0 and stream.exit_code == 0, stream.output
    assert not list((tmp_path / "cache").glob("*/train"))  # the run's features were read

    def ids(out):
        return [line.split("#")[1].split()[0] for line in out.splitlines() if "#" in line]

    assert ids(plain.output) == ids(stream.output) and len(ids(plain.output)) == 6  # top 3 each way
