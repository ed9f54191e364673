"""Tests of dtrak.counterfactual: removal sets, resumable retraining, regeneration, the stage."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dtrak import pipeline
from dtrak.config import preset
from dtrak.farm import LocalExecutor, load_jobs, run_job
from dtrak.stages import counterfactual as cf
from dtrak.stages.run import RESULT_NEUTRAL_KEYS
from dtrak.train import train_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny scored run: 64 training images, 8 generated ones (one per batch), 10 steps."""
    base = preset("tiny")
    cfg = dataclasses.replace(
        base, runtime=dataclasses.replace(base.runtime, threads=1),
        train=dataclasses.replace(base.train, steps=10),
        sampling=dataclasses.replace(base.sampling, steps=3, batch_size=1))
    run = pipeline.open_run(tmp_path_factory.mktemp("cf") / "run", cfg, progress=False)
    pipeline.run_stages(run, ("data", "train", "generate", "featurize", "score"))
    return run


# --- removal sets ------------------------------------------------------------------------------


def test_removal_count_is_a_count_or_a_fraction():
    assert cf.removal_count(1000, 5000) == 1000
    assert cf.removal_count(0.2, 5000) == 1000
    assert cf.removal_count(0.001, 64) == 1  # at least one
    for bad, match in ((64, "remain"), (2.5, "whole"), (0, "> 0"), (0.9999, "remain")):
        with pytest.raises(ValueError, match=match):
            cf.removal_count(bad, 64)


def test_removed_indices_are_exactly_the_top_k_of_the_targets_row():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((10, 50))
    targets = np.array([7, 2, 9])
    removed = cf.removal_sets("trak", scores, targets, 5, 50, seed=42)
    assert removed.shape == (3, 5)
    for row, t in zip(removed, targets, strict=True):
        np.testing.assert_array_equal(row, np.argsort(scores[t])[::-1][:5])  # highest first
        kept = np.setdiff1d(np.arange(50), row)
        assert scores[t, row].min() > scores[t, kept].max()
    ties = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    np.testing.assert_array_equal(cf.top_k_removal(ties, [0], 2), [[1, 2]])  # lower index wins
    with pytest.raises(ValueError, match="columns"):
        cf.removal_sets("trak", scores, targets, 5, 49, seed=42)
    with pytest.raises(ValueError, match="score matrix"):
        cf.removal_sets("trak", None, targets, 5, 50, seed=42)
    with pytest.raises(ValueError, match="out of range"):
        cf.top_k_removal(scores, [10], 5)


def test_random_removal_is_seeded_per_target_and_ignores_scores():
    a = cf.removal_sets(cf.RANDOM, None, [3, 5], 8, 64, seed=42)
    b = cf.removal_sets(cf.RANDOM, np.zeros((9, 64)), [5], 8, 64, seed=42)
    assert a.shape == (2, 8) and all(len(set(r)) == 8 for r in a) and a.max() < 64
    np.testing.assert_array_equal(a[1], b[0])  # a target's set depends on (seed, target) only
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, cf.random_removal(64, [3, 5], 8, seed=0))


def test_targets_are_a_seeded_choice():
    t = cf.choose_targets(100, 10, seed=42)
    assert len(set(t)) == 10 and t.max() < 100
    np.testing.assert_array_equal(t, cf.choose_targets(100, 10, seed=42))
    assert not np.array_equal(t, cf.choose_targets(100, 10, seed=0))
    with pytest.raises(ValueError, match="n_targets"):
        cf.choose_targets(5, 6, seed=42)
    # more targets later keep the earlier ones (and their finished retrainings)
    np.testing.assert_array_equal(cf.choose_targets(100, 4, seed=42), t[:4])
    # so a run takes a larger n_targets without --overwrite
    assert "counterfactual.n_targets" in RESULT_NEUTRAL_KEYS


def test_jobs_are_target_major(tiny_run):
    """A run stopped part-way has every method of its first targets."""
    removed = {m: np.array([[0, 1], [2, 3]]) for m in ("random", "trak", "dtrak")}
    jobs = cf.counterfactual_jobs(tiny_run, [3, 7], removed)
    assert [j.name for j in jobs] == ["random-t0003", "trak-t0003", "dtrak-t0003",
                                      "random-t0007", "trak-t0007", "dtrak-t0007"]
    assert jobs[4].indices == (0, 1, *range(4, 64))


# --- metrics -----------------------------------------------------------------------------------


def test_pixel_l2_and_summary():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, (3, 1, 4, 4)), rng.uniform(-1, 1, (3, 1, 4, 4))
    expected = [np.linalg.norm(a[i].ravel() - b[i].ravel()) for i in range(3)]
    np.testing.assert_allclose(cf.pixel_l2(a, b), expected)
    recs = cf.counterfactual_records(a, {"x": b, "y": a}, [4, 5, 6])
    assert [r["clip_cos"] for r in recs] == [None] * 6
    summary = {(s["method"], s["metric"]): s for s in cf.summarize(recs)}
    assert set(summary) == {("x", "pixel_l2"), ("y", "pixel_l2")}
    assert summary["x", "pixel_l2"]["mean"] == pytest.approx(np.mean(expected))
    assert summary["x", "pixel_l2"]["median"] == pytest.approx(np.median(expected))
    assert summary["y", "pixel_l2"] == {"method": "y", "metric": "pixel_l2", "mean": 0.0,
                                        "median": 0.0, "n": 3}
    with pytest.raises(ValueError, match="shapes"):
        cf.pixel_l2(a, b[:2])


def test_paired_differences_pair_methods_by_target():
    recs = [{"target": t, "method": m, "pixel_l2": v, "clip_cos": None}
            for t, row in zip((4, 5, 6), ((1.0, 2.0, 4.0), (2.0, 2.5, 5.0), (3.0, 3.5, 3.0)),
                              strict=True)
            for m, v in zip(("random", "trak", "dtrak"), row, strict=True)]
    recs.append({"target": 7, "method": "dtrak", "pixel_l2": 9.0, "clip_cos": None})  # unpaired
    diffs = {(d["a"], d["b"]): d for d in cf.paired_differences(recs, n_boot=200, seed=0)}
    assert set(diffs) == {("trak", "random"), ("dtrak", "random"), ("dtrak", "trak")}
    d = diffs["dtrak", "trak"]
    assert d["metric"] == "pixel_l2" and d["n"] == 3  # target 7 has no trak record
    assert d["diff"] == pytest.approx(np.median([4.0, 5.0, 3.0]) - np.median([2.0, 2.5, 3.5]))
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert "dtrak - trak" in cf._table(cf.summarize(recs), list(diffs.values()))


def test_same_seed_regenerates_the_identical_image(tiny_run):
    gen = np.load(tiny_run.paths.gen / "images.npy")
    model = tiny_run.model()
    again = np.stack([cf.regenerate(tiny_run.family, model, tiny_run.cfg, i) for i in (0, 5)])
    np.testing.assert_array_equal(cf.pixel_l2(gen[[0, 5]], again), [0.0, 0.0])


# --- retraining --------------------------------------------------------------------------------


def test_a_killed_job_resumes_and_finished_jobs_are_not_redone(tiny_run, tmp_path):
    removed = {"trak": np.array([[0, 1, 2], [3, 9, 10]])}
    jobs = cf.counterfactual_jobs(tiny_run, [1, 4], removed)
    assert [j.name for j in jobs] == ["trak-t0001", "trak-t0004"]
    assert jobs[1].indices == tuple(i for i in range(64) if i not in (3, 9, 10))
    assert {j.seed for j in jobs} == {tiny_run.cfg.counterfactual.seed}
    jobs = [dataclasses.replace(j, directory=str(tmp_path / j.name)) for j in jobs]
    finished, killed = jobs[0], jobs[1]
    run_job(finished)
    done_before = (tmp_path / finished.name / "done.json").stat().st_mtime_ns
    images = torch.from_numpy(np.load(killed.images))
    train_model(images, tiny_run.cfg.model, tiny_run.cfg.train, killed.directory,
                indices=np.array(killed.indices), seed=killed.seed, stop_at=5, progress=False)
    assert not killed.done

    LocalExecutor(1, threads_per_worker=1, progress=False).run(jobs)
    assert all(j.done for j in jobs)
    assert (tmp_path / finished.name / "done.json").stat().st_mtime_ns == done_before
    stats = (tmp_path / killed.name / "stats.jsonl").read_text().splitlines()
    stats = [json.loads(line) for line in stats]
    assert [s["step"] for s in stats] == [5, 10]  # steps 1-5 were not trained again
    whole = dataclasses.replace(killed, directory=str(tmp_path / "uninterrupted"))
    run_job(whole)
    a = load_file(str(tmp_path / killed.name / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "uninterrupted" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


# --- the stage ---------------------------------------------------------------------------------


def _fake_clip_module() -> types.ModuleType:
    def clip_cosine(a, b, clip_path):
        assert clip_path == "/nowhere/clip" and a.shape == b.shape
        a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
        return torch.nn.functional.cosine_similarity(a, b, dim=1)

    module = types.ModuleType("dtrak.clip")
    module.clip_cosine = clip_cosine
    return module


def test_stage_writes_results_panels_and_resumes(tiny_run, monkeypatch):
    run, root = tiny_run, tiny_run.paths.counterfactual
    dtrak_scores = run.paths.scores("dtrak", "gen")
    dtrak_scores.unlink()  # a missing score matrix is computed (prior lambda) and saved
    out = cf.stage_counterfactual(run)
    assert dtrak_scores.exists() and out["k"] == 8

    res = json.loads((run.paths.results / "counterfactual.json").read_text())
    targets = res["settings"]["targets"]
    assert len(targets) == 2 and targets == out["targets"]
    assert {(r["target"], r["method"]) for r in res["records"]} == {
        (t, m) for t in targets for m in ("random", "trak", "dtrak")}
    assert all(r["pixel_l2"] > 0 and r["clip_cos"] is None for r in res["records"])
    assert {(s["method"], s["metric"], s["n"]) for s in res["summary"]} == {
        (m, "pixel_l2", 2) for m in ("random", "trak", "dtrak")}
    assert {(d["a"], d["b"], d["n"]) for d in res["differences"]} == {
        ("trak", "random", 2), ("dtrak", "random", 2), ("dtrak", "trak", 2)}

    # removal sets are the top 8 of the saved scores; each job trains on the rest
    trak = np.load(run.paths.scores("trak", "gen"))
    np.testing.assert_array_equal(np.load(root / "removed" / "trak.npy"),
                                  cf.top_k_removal(trak, targets, 8))
    jobs = {j.name: j for j in load_jobs(root / "jobs.json", run.paths.root)}
    assert len(jobs) == 6 and all(j.done for j in jobs.values())
    t = targets[0]
    job = jobs[cf.job_name("trak", t)]
    assert set(job.indices) == set(range(64)) - set(cf.top_k_removal(trak, [t], 8)[0])

    # the metric is the distance to the image the retrained model regenerates
    gen = np.load(run.paths.gen / "images.npy")
    sample = np.load(root / "models" / job.name / "sample.npy")
    rec = next(r for r in res["records"] if (r["target"], r["method"]) == (t, "trak"))
    assert rec["pixel_l2"] == pytest.approx(np.linalg.norm(gen[t].ravel() - sample.ravel()))

    for t in targets:
        assert (root / "panels" / f"target-{t:04d}.png").exists()
        for m in ("random", "trak", "dtrak"):
            assert (root / "images" / m / f"{t:04d}.png").exists()
    assert (root / "pixel_l2.png").exists() and not (root / "clip_cos.png").exists()

    # again, with CLIP: nothing is retrained, clip_cos is filled in
    stamps = {n: (root / "models" / n / "done.json").stat().st_mtime_ns for n in jobs}
    monkeypatch.setattr(cf, "clip_cosine", _fake_clip_module().clip_cosine)
    attribution = dataclasses.replace(run.cfg.attribution, clip_path="/nowhere/clip")
    run2 = pipeline.open_run(run.paths.root, dataclasses.replace(run.cfg, attribution=attribution),
                             progress=False)
    cf.stage_counterfactual(run2)
    assert stamps == {n: (root / "models" / n / "done.json").stat().st_mtime_ns for n in jobs}
    res = json.loads((run.paths.results / "counterfactual.json").read_text())
    assert all(-1 <= r["clip_cos"] <= 1 for r in res["records"])
    assert {s["metric"] for s in res["summary"]} == {"pixel_l2", "clip_cos"}
    assert (root / "clip_cos.png").exists()
