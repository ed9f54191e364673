"""End to end: `dtrak run configs/tiny.toml --out RUN` through every stage, from the CLI."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from dtrak.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                               "-q"])
    assert res.exit_code == 0, res.output
    # foundation
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 40
    assert (out / "data" / "splits.json").exists() and (out / "data" / "preview.png").exists()
    assert (out / "model" / "unet" / "config.json").exists()
    assert len(list((out / "model" / "checkpoints").glob("step-*"))) == 4
    gen = np.load(out / "gen" / "images.npy")
    assert gen.shape == (8, 1, 8, 8) and np.abs(gen).max() <= 1
    assert (out / "gen" / "grid.png").exists()
    # attribution engine and every baseline of the config
    methods = saved["attribution"]["methods"]
    assert len(methods) == 18
    for method in methods:
        for targets, n in (("val", 16), ("gen", 8)):
            path = out / "scores" / method / f"{targets}.npy"
            if method == "journey-trak" and targets == "val":
                assert not path.exists()  # generated targets only
                continue
            s = np.load(path)
            assert s.shape == (n, 64) and np.isfinite(s).all(), method
    # LDS: kernel methods get both lambda selections, the others one record
    lds = json.loads((out / "results" / "lds.json").read_text())
    recs = lds["records"]
    keys = {(r["method"], r["targets"], r["lambda_selection"]) for r in recs}
    for m in ("trak", "dtrak", "relative-if", "renorm-if"):
        for t in ("val", "gen"):
            assert {(m, t, "paper"), (m, t, "heldout")} <= keys
    assert ("journey-trak", "gen", "heldout") in keys
    # method@K: its own features (K = 5 instead of 3), recorded with its K
    assert (out / "features" / "full" / "train" / "square-uniform5-gaussian64").is_dir()
    assert {r["n_timesteps"] for r in recs if r["method"] == "dtrak@5"} == {5}
    assert {r["n_timesteps"] for r in recs if r["method"] == "dtrak"} == {3}
    assert ("random", "val", None) in keys and ("datamodel", "gen", None) in keys
    for r in recs:
        assert -100 <= r["ci_low"] <= r["ci_high"] <= 100
        assert r["n_subsets"] == 4
        assert (r["lambda"] > 0) if r["lambda_selection"] else r["lambda"] is None
    # paired comparison from the CLI
    res = runner.invoke(main, ["compare", "dtrak", "random", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "val: LDS(dtrak) - LDS(random) = " in res.output and "gen: " in res.output
    res = runner.invoke(main, ["compare", "dtrak", "clip-dot", "--out", str(out)])
    assert res.exit_code == 2 and "no LDS of 'clip-dot'" in res.output
    # counterfactual
    cf = json.loads((out / "results" / "counterfactual.json").read_text())
    assert {r["method"] for r in cf["records"]} == {"random", "trak", "dtrak"}
    assert len(cf["records"]) == 6 and all(r["pixel_l2"] >= 0 for r in cf["records"])
    assert {(s["method"], s["metric"]) for s in cf["summary"]} >= {
        (m, "pixel_l2") for m in ("random", "trak", "dtrak")}
    assert len(list((out / "counterfactual" / "panels").glob("*.png"))) == 2
    # report
    html = (out / "report" / "index.html").read_text()
    assert "LDS" in html and "<img" in html
    for img in (out / "report").glob("*.png"):
        assert f'src="{img.name}"' in html
    # a second run does nothing new and succeeds; a changed config is refused
    res = runner.invoke(main, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                               "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["train", "--out", str(out), "--set", "train.steps=41"])
    assert res.exit_code == 2 and "different config" in res.output
    # a moved run directory continues: nothing is retrained, the results are the same
    moved = tmp_path / "moved"
    out.rename(moved)
    stamps = {p: p.stat().st_mtime_ns for p in moved.glob("*/models/*/done.json")}
    assert len(stamps) == 4 + 4 + 6  # LDS subsets, pool, counterfactual retrainings
    res = runner.invoke(main, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(moved),
                               "-q"])
    assert res.exit_code == 0, res.output
    assert stamps == {p: p.stat().st_mtime_ns for p in moved.glob("*/models/*/done.json")}
    again = json.loads((moved / "results" / "lds.json").read_text())["records"]
    def results(records):  # everything but the time each method took
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert results(again) == results(recs)
    assert all(r["seconds"] >= 0 for r in recs)
    assert all(not Path(j["directory"]).is_absolute()
               for j in json.loads((moved / "lds" / "jobs.json").read_text()))
