"""The run directory as a trustworthy record: nothing stale, nothing silently damaged.

Each test reproduces a case that once gave a wrong result without a word (a regenerated
target set scored against old ground truth, a truncated store grown back with zeros, pool
scores kept after their pool was deleted), or wasted work (an error found only after
training), and checks the fixed behaviour.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

from dtrak import cli, pipeline
from dtrak.artefacts import (
    DamagedArtefactError,
    as_os_error,
    check_npy,
    create_npy,
    load_npy,
    save_npy,
)
from dtrak.config import ConfigError, preset
from dtrak.store import FeatureStore

STAGES = ("data", "train", "generate", "featurize", "score", "lds")


def _tiny(**sections):
    cfg = preset("tiny")
    base = dict(
        train=dataclasses.replace(cfg.train, steps=10),
        sampling=dataclasses.replace(cfg.sampling, n_images=6, steps=3),
        attribution=dataclasses.replace(cfg.attribution, n_targets=6, n_timesteps=2,
                                        proj_dim=32, methods=("trak", "dtrak", "datamodel")),
        lds=dataclasses.replace(cfg.lds, n_subsets=3, seeds=(0,), eval_timesteps=3,
                                noise_seeds=(0,), n_boot=50),
        runtime=dataclasses.replace(cfg.runtime, threads=1),
    )
    for name, changes in sections.items():
        base[name] = dataclasses.replace(base.get(name, getattr(cfg, name)), **changes)
    return dataclasses.replace(cfg, **base)


def _lds(root: Path) -> dict:
    records = json.loads((root / "results" / "lds.json").read_text())["records"]
    return {(r["method"], r["targets"], r.get("selection")): r["lds"] for r in records}


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "run"
    pipeline.run_stages(pipeline.open_run(root, _tiny(), progress=False), STAGES)
    return root


# ------------------------------------------------------------------ stale artefacts


def test_overwritten_sampling_and_lds_keys_give_a_fresh_runs_results(tiny_run, tmp_path):
    """--overwrite of sampling.gen_seed regenerates the targets and their ground truth;
    of lds.seed_base, the pool and the pool methods' scores: both equal fresh runs."""
    run = tmp_path / "changed"
    shutil.copytree(tiny_run, run)
    new_gen = _tiny(sampling={"gen_seed": 7})
    pipeline.run_stages(pipeline.open_run(run, new_gen, overwrite=True, progress=False), STAGES)
    fresh = tmp_path / "fresh-gen"
    pipeline.run_stages(pipeline.open_run(fresh, new_gen, progress=False), STAGES)
    assert _lds(run) == _lds(fresh)
    np.testing.assert_array_equal(np.load(run / "lds" / "truth" / "gen.npy"),
                                  np.load(fresh / "lds" / "truth" / "gen.npy"))

    new_pool = _tiny(sampling={"gen_seed": 7}, lds={"seed_base": 5})
    pipeline.run_stages(pipeline.open_run(run, new_pool, overwrite=True, progress=False), STAGES)
    fresh = tmp_path / "fresh-pool"
    pipeline.run_stages(pipeline.open_run(fresh, new_pool, progress=False), STAGES)
    for set_name in ("val", "gen"):
        np.testing.assert_array_equal(np.load(run / "scores" / "datamodel" / f"{set_name}.npy"),
                                      np.load(fresh / "scores" / "datamodel" / f"{set_name}.npy"))
    assert _lds(run) == _lds(fresh)


def test_scores_made_from_other_inputs_are_recomputed(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "scores" / "trak" / "val.npy"
    before = np.load(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["made_from"]
    np.save(path, np.zeros_like(before))  # as if made from something else...
    path.with_suffix(".json").write_text(json.dumps({**meta, "made_from": "other"}))
    (run / "results" / "lds.json").unlink()  # the lambda stays the prior it was made with
    pipeline.run_stages(pipeline.open_run(run, None, progress=False), ("score",))
    np.testing.assert_array_equal(np.load(path), before)  # ...so it was recomputed


# ------------------------------------------------------------------ damaged files


def test_a_truncated_feature_store_is_refused_never_grown_back(tmp_path):
    meta = {"output": "square"}
    store = FeatureStore(tmp_path / "s", 10, 4, meta)
    store.write(np.arange(10), np.ones((10, 4)))
    del store
    path = tmp_path / "s" / "features.npy"
    size = path.stat().st_size
    os.truncate(path, size - 5 * 4 * 4)  # half the rows gone
    with pytest.raises(DamagedArtefactError, match="features.npy is damaged"):
        FeatureStore(tmp_path / "s", 10, 4, meta)
    assert path.stat().st_size == size - 80  # not resized
    with pytest.raises(DamagedArtefactError, match="done.npy is damaged"):
        os.truncate(tmp_path / "s" / "done.npy", 100)
        check_npy(tmp_path / "s" / "done.npy")


def test_truncated_generated_images_are_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    images = run / "gen" / "images.npy"
    os.truncate(images, images.stat().st_size // 2)
    r = pipeline.open_run(run, None, progress=False)
    with pytest.raises(DamagedArtefactError, match="images.npy is damaged"):
        pipeline.run_stages(r, ("generate",))


def test_an_unfinished_generation_is_no_target_set(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    done = run / "gen" / "done.npy"
    mask = np.load(done)
    mask[-1] = 0
    np.save(done, mask)
    r = pipeline.open_run(run, None, progress=False)
    with pytest.raises(FileNotFoundError, match="generate"):
        r.target_sets()


def test_damaged_model_weights_are_named(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(DamagedArtefactError, match="unet: cannot load the model"):
        pipeline.open_run(run, None, progress=False).model()


def test_checked_npy_round_trip(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy", (3, 4), np.float32), a)
    with pytest.raises(DamagedArtefactError, match="shape"):
        load_npy(tmp_path / "a.npy", (4, 3))
    m = create_npy(tmp_path / "m.npy", (5, 2), np.float64)
    assert m.shape == (5, 2) and not m.any()
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(DamagedArtefactError, match="unreadable header"):
        check_npy(tmp_path / "bad.npy")


# ------------------------------------------------------------------ early errors


@pytest.mark.parametrize(("sections", "message"), [
    ({"attribution": {"methods": ("trak", "drak")}}, "unknown attribution method 'drak'"),
    ({"attribution": {"outputs": ("loss", "sqaure")}}, "unknown output function 'sqaure'"),
    ({"counterfactual": {"methods": ("random", "nope")}}, "counterfactual.methods"),
    ({"attribution": {"methods": ("trak-ensemble-8",)}}, "reads 8 pool models"),
    ({"counterfactual": {"remove": 64}}, "removes 64 of 64"),
])
def test_config_problems_are_reported_before_anything_is_written(tmp_path, sections, message):
    cfg = dataclasses.replace(_tiny(**sections), stages=(*STAGES, "counterfactual"))
    with pytest.raises(ConfigError, match=message):
        pipeline.open_run(tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_too_few_subsets_are_refused():
    with pytest.raises(ConfigError, match="lds.n_subsets: must be >= 3"):
        _tiny(lds={"n_subsets": 2}).validate()


def test_a_failed_first_command_does_not_block_the_corrected_retry(tmp_path):
    bad = _tiny(data={"name": "cifar2", "root": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        pipeline.run_stages(pipeline.open_run(tmp_path / "run", bad, progress=False), ("data",))
    good = pipeline.open_run(tmp_path / "run", _tiny(), progress=False)  # no --overwrite
    assert good.cfg.data.name == "digits"


# ------------------------------------------------------------------ read-only use


def test_compare_and_report_elsewhere_write_nothing_into_the_run(tiny_run, tmp_path):
    before = _snapshot(tiny_run)
    result = CliRunner().invoke(cli.main, ["compare", "dtrak", "trak", "--out", str(tiny_run)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.main, ["report", str(tiny_run), "-q", "--to",
                                           str(tmp_path / "page")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page" / "index.html").is_file()
    assert _snapshot(tiny_run) == before


def test_file_system_errors_are_one_line(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    monkeypatch.setattr(pipeline, "open_run", full)
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: the disk is full ({tmp_path / 'x.npy'}); free some space (or use a run "
        "directory on another disk) and run the command again: finished work is kept"]


# ------------------------------------------------------------------ the fault catalogue's finds


@pytest.mark.parametrize(("sections", "key"), [
    ({"lds": {"noise_seeds": ()}}, "lds.noise_seeds"),
    ({"lds": {"n_boot": 0}}, "lds.n_boot"),
    ({"attribution": {"n_targets": -1}}, "attribution.n_targets"),
])
def test_empty_or_negative_counts_are_refused(sections, key):
    with pytest.raises(ConfigError, match=key):
        _tiny(**sections).validate()


def test_images_changed_on_disk_are_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    content = run / "data" / "content.json"
    saved = json.loads(content.read_text())
    content.write_text(json.dumps({**saved, "train": "made-from-other-images"}))
    with pytest.raises(pipeline.RunConfigError, match="train images .* differ"):
        _ = pipeline.open_run(run, None, progress=False).dataset


def test_deleted_generated_images_are_generated_again(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "gen" / "images.npy").unlink()  # done.npy still says every row is written
    pipeline.run_stages(pipeline.open_run(run, None, progress=False), ("generate",))
    np.testing.assert_array_equal(np.load(run / "gen" / "images.npy"),
                                  np.load(tiny_run / "gen" / "images.npy"))


def test_damaged_predictions_and_checkpoints_are_named(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    preds = run / "results" / "lds_predictions.npz"
    os.truncate(preds, preds.stat().st_size // 2)
    result = CliRunner().invoke(cli.main, ["compare", "dtrak", "trak", "--out", str(run)])
    assert result.exit_code == 2 and "lds_predictions.npz is damaged" in result.output

    model = run / "model"
    (model / "done.json").unlink()
    shutil.rmtree(model / "unet")
    ckpt = sorted((model / "checkpoints").glob("step-*"))[-1]
    os.truncate(ckpt / "optimizer.safetensors", 10)
    with pytest.raises(DamagedArtefactError, match=f"checkpoint {ckpt} is damaged"):
        pipeline.run_stages(pipeline.open_run(run, None, progress=False), ("train",))


def test_a_full_disk_reported_by_a_library_is_an_os_error(tmp_path):
    err = as_os_error(SafetensorError("Error while serializing: I/O error: No space left on "
                                      "device (os error 28)"), tmp_path)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert cli._os_error(err).startswith("error: the disk is full"[7:])
