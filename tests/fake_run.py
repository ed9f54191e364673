"""TEST FIXTURE: writes a small FAKE run directory, every artefact filled with random data.

Nothing here is a result: the numbers, images and scores are random. It exists so the report
(and anything else that only reads saved artefacts) can be tested in a second without
training a model. The layout follows :mod:`dtrak.paths`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtrak.config import preset, to_dict
from dtrak.images import save_grid, save_png
from dtrak.paths import RunPaths

__all__ = ["FakeRun", "make_fake_run"]

METHODS = ("trak", "dtrak")
TARGETS = ("val", "gen")
SELECTIONS = ("paper", "heldout")
LAMBDAS = [1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
CLASS_NAMES = ("automobile", "horse")


@dataclass(frozen=True)
class FakeRun:
    """A fake run: its directory and the images a pipeline would load from the data set."""

    root: Path
    train_images: np.ndarray  # [N, C, H, W] in [-1, 1]
    val_images: np.ndarray  # [V, C, H, W] in [-1, 1]
    gen_images: np.ndarray  # [G, C, H, W] in [-1, 1]
    n_targets: int  # rows of every score matrix


def _smooth_images(rng: np.random.Generator, n: int, channels: int, res: int) -> np.ndarray:
    """Random blurry colour blobs [n, C, res, res] in [-1, 1] (coarse noise upsampled)."""
    coarse = rng.uniform(-1, 1, size=(n, channels, 4, 4)).astype(np.float32)
    reps = -(-res // 4)
    return np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :res, :res]


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _data(paths: RunPaths, train: np.ndarray, val: np.ndarray) -> None:
    n, c, h, _ = train.shape
    counts = {name: int(np.ceil(n / 2)) if i == 0 else n // 2 for i, name in enumerate(CLASS_NAMES)}
    vcounts = {name: int(np.ceil(len(val) / 2)) if i == 0 else len(val) // 2
               for i, name in enumerate(CLASS_NAMES)}
    _write_json(paths.data / "summary.json", {
        "name": "fake-cifar2", "source": "random test fixture", "resolution": h,
        "channels": c, "class_names": list(CLASS_NAMES),
        "train": {"size": n, "class_counts": counts},
        "val": {"size": len(val), "class_counts": vcounts},
    })
    _write_json(paths.splits, {"train": list(range(n)), "val": list(range(n, n + len(val)))})
    save_grid(train[:16], paths.data / "preview.png", nrow=8)


def _model(paths: RunPaths, rng: np.random.Generator, steps: int = 200) -> None:
    paths.model.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        loss = 0.05 + 0.9 * np.exp(-step / 40) + 0.03 * rng.random()
        lines.append(json.dumps({"step": step, "loss": float(loss), "lr": 1e-3,
                                 "seconds": step * 0.01}))
    (paths.model / "stats.jsonl").write_text("\n".join(lines) + "\n")
    _write_json(paths.model / "done.json", {"steps": steps, "final_loss": 0.0612,
                                            "seconds": 2.0, "steps_per_second": 100.0,
                                            "n_examples": 48})


def _scores(paths: RunPaths, rng: np.random.Generator, n_targets: int, n_train: int) -> None:
    for method in METHODS:
        for targets in TARGETS:
            path = paths.scores(method, targets)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, rng.normal(size=(n_targets, n_train)).astype(np.float32))
            _write_json(path.with_suffix(".json"), {
                "method": method, "targets": targets, "lambda": 10.0,
                "lambda_selection": "paper", "output": "loss" if method == "trak" else "square",
                "n_timesteps": 3, "proj_dim": 64,
            })


def _lds(paths: RunPaths, rng: np.random.Generator, n_targets: int) -> dict:
    records, curves = [], []
    for method in METHODS:
        for targets in TARGETS:
            base = 10.0 + 15.0 * (method == "dtrak") + rng.uniform(0, 5)
            curve = base - 3.0 * (np.log10(LAMBDAS) - 1.0) ** 2 / 4 + rng.normal(0, 0.5, 6)
            curves.append({"method": method, "targets": targets, "lambdas": LAMBDAS,
                           "lds": curve.tolist(), "ci_low": (curve - 4).tolist(),
                           "ci_high": (curve + 4).tolist()})
            for selection in SELECTIONS:
                lds = float(curve.max() - (1.3 if selection == "heldout" else 0.0))
                records.append({
                    "method": method, "targets": targets, "lds": lds,
                    "ci_low": lds - float(rng.uniform(2, 5)),
                    "ci_high": lds + float(rng.uniform(2, 5)),
                    "lambda": LAMBDAS[int(np.argmax(curve))], "lambda_selection": selection,
                    "n_subsets": 4, "n_targets": n_targets, "boot_sd": 1.7,
                })
    ceiling = [{"targets": t, "lds": 61.23, "ci_low": 55.5, "ci_high": 66.04, "n_seeds": 2}
               for t in TARGETS]
    result = {"records": records, "lds_by_lambda": curves, "ceiling": ceiling,
              "settings": {"n_subsets": 4, "alpha": 0.5, "n_boot": 50, "n_timesteps": 3,
                           "proj_dim": 64}}
    _write_json(paths.results / "lds.json", result)
    return result


def _counterfactual(paths: RunPaths, rng: np.random.Generator, gen: np.ndarray,
                    mode: str, n: int = 3) -> None:
    methods = ("random", *METHODS)
    records = [{"target": t, "method": m, "pixel_l2": float(rng.uniform(2, 9)),
                "clip_cos": float(rng.uniform(0.6, 1.0)) if m != "random" else None}
               for t in range(n) for m in methods]
    summary = [{"method": m, "metric": "pixel_l2", "mean": 5.0, "median": 5.1, "n": n}
               for m in methods]
    differences = [{"a": m, "b": "random", "metric": "pixel_l2", "diff": 0.4, "ci_low": -0.2,
                    "ci_high": 1.1, "p_le_0": 0.2, "n": n, "n_boot": 100} for m in METHODS]
    _write_json(paths.results / "counterfactual.json",
                {"records": records, "summary": summary, "differences": differences})
    for t in range(n):
        changed = [np.clip(gen[t] + rng.normal(0, 0.3, gen[t].shape), -1, 1) for _ in methods]
        if mode == "panels":
            save_grid(np.stack([gen[t], *changed]), paths.counterfactual / "panels" /
                      f"target-{t:04d}.png", nrow=len(methods) + 1)
        else:
            for m, image in zip(methods, changed, strict=True):
                save_png(image, paths.counterfactual / "images" / m / f"{t:04d}.png")


def make_fake_run(
    root: str | Path,
    n_train: int = 48,
    n_val: int = 12,
    n_gen: int = 12,
    n_targets: int = 10,
    channels: int = 3,
    res: int = 16,
    counterfactual: str | None = "panels",
    seed: int = 0,
) -> FakeRun:
    """Write a fake run under ``root`` (FAKE data; for tests only).

    ``counterfactual``: "panels" (ready-made panels), "images" (per-method images only) or
    None (no counterfactual results at all).
    """
    rng = np.random.default_rng(seed)
    paths = RunPaths(Path(root))
    train = _smooth_images(rng, n_train, channels, res)
    val = _smooth_images(rng, n_val, channels, res)
    gen = _smooth_images(rng, n_gen, channels, res)
    cfg = to_dict(preset("tiny"))
    cfg["name"] = "fake-run"
    paths.root.mkdir(parents=True, exist_ok=True)
    _write_json(paths.config, cfg)
    _data(paths, train, val)
    _model(paths, rng)
    paths.gen.mkdir(parents=True, exist_ok=True)
    np.save(paths.gen / "images.npy", gen)
    save_grid(gen, paths.gen / "grid.png", nrow=6)
    _scores(paths, rng, n_targets, n_train)
    _lds(paths, rng, n_targets)
    if counterfactual is not None:
        _counterfactual(paths, rng, gen, counterfactual)
    return FakeRun(paths.root, train, val, gen, n_targets)
