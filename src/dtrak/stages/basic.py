"""The data, train and generate stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import figures
from ..artefacts import create_npy, open_npy, save_json
from ..config import Config
from ..data import save_split_indices
from ..families import CaptionedImages, ModelFamily
from ..images import save_grid, save_pngs
from ..train import train_model
from .run import Run

__all__ = ["generate_into", "stage_data", "stage_generate", "stage_train", "train_images_file"]


def stage_data(run: Run) -> dict:
    """Resolve the splits, save their indices, a summary and a preview grid."""
    ds = run.dataset
    run.paths.data.mkdir(parents=True, exist_ok=True)
    if not run.paths.splits.exists():
        save_split_indices(ds, run.paths.splits)
    summary = ds.summary()
    (run.paths.data / "summary.json").write_text(json.dumps(summary, indent=2))
    preview = run.paths.data / "preview.png"
    if not preview.exists():
        save_grid(ds.train.images[:64], preview, nrow=8)
    return summary


def train_images_file(run: Run) -> Path:
    """The training images as one ``.npy`` file that farm workers read (with their captions
    beside it, ``train_images.captions.json``, for a text-conditioned family, and
    ``train_images.cache.json`` naming the training set's encoding cache, relative to
    this folder, when the family caches its encodings)."""
    path = run.paths.data / "train_images.npy"
    examples = run.raw_train_examples
    captions = path.with_suffix(".captions.json")
    if isinstance(examples, CaptionedImages) and not captions.exists():
        run.paths.data.mkdir(parents=True, exist_ok=True)
        save_json(captions, list(examples.captions))
    cache, pointer = run.train_cache, path.with_suffix(".cache.json")  # encodes if need be
    if cache is not None:
        run.paths.data.mkdir(parents=True, exist_ok=True)
        save_json(pointer, {"directory": os.path.relpath(cache, run.paths.data)})
    else:
        pointer.unlink(missing_ok=True)
    if not path.exists():
        run.paths.data.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, run.dataset.train.images.numpy())
        tmp.rename(path)
    return path


def stage_train(run: Run) -> dict:
    """Train the full model on the whole training split (resumes from checkpoints)."""
    res = train_model(run.train_examples, run.cfg.model, run.cfg.train, run.paths.model,
                      progress=run.progress, desc="train full model",
                      device=run.placement.device)
    return {"steps": res.steps, "final_loss": res.final_loss,
            "steps_per_second": res.steps_per_second, "device": str(run.placement.device),
            "parameters": run.family.describe(run.model())["parameters"]}


def generate_into(family: ModelFamily, model, run_cfg: Config, directory: Path, n: int,
                  progress: bool = True, desc: str = "generate",
                  keep_trajectory: bool | None = None,
                  prompts: list[str] | None = None) -> np.ndarray:
    """Generate images 0..n-1 into ``directory`` (resumable by batch); returns [n, C, H, W].

    A text-conditioned model generates image i from ``prompts[i]`` (kept in prompts.json)."""
    sc = run_cfg.sampling
    keep = sc.save_trajectory if keep_trajectory is None else keep_trajectory
    directory.mkdir(parents=True, exist_ok=True)
    shape = family.sample_shape(model)
    files = [directory / "images.npy", directory / "done.npy"]
    files += [directory / "trajectory.npy"] if keep else []
    if not all(f.exists() for f in files):  # a missing array: no row of it is known, start over
        for f in files:
            f.unlink(missing_ok=True)
    imgs = _memmap(directory / "images.npy", (n, *shape), np.float32)
    done = _memmap(directory / "done.npy", (n,), np.uint8)
    traj = (_memmap(directory / "trajectory.npy", (n, sc.steps, *shape), np.float16)
            if keep else None)
    if prompts is not None:
        save_json(directory / "prompts.json", list(prompts))
    todo = np.flatnonzero(done == 0)
    bar = tqdm(total=n, initial=n - len(todo), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(todo), sc.batch_size):
        ids = todo[start:start + sc.batch_size]
        text = {} if prompts is None else {"prompts": [prompts[int(i)] for i in ids]}
        out = family.sample(model, run_cfg.model, sc, [int(i) for i in ids], keep, **text)
        imgs[ids] = out.images.numpy()
        if traj is not None:
            traj[ids] = out.trajectory.numpy().astype(np.float16)
            traj.flush()
        imgs.flush()
        done[ids] = 1
        done.flush()
        bar.update(len(ids))
    bar.close()
    meta = {"n": n, "sampler": sc.sampler, "steps": sc.steps, "eta": sc.eta,
            "gen_seed": sc.gen_seed, "seed_rule": "image i: 1000 * gen_seed + i",
            "timesteps": out.timesteps.tolist() if len(todo) else None}
    meta_path = directory / "meta.json"
    if len(todo) or not meta_path.exists():
        if meta["timesteps"] is None:
            meta.pop("timesteps")
        meta_path.write_text(json.dumps(meta, indent=2))
    return np.array(imgs)


def _memmap(path: Path, shape: tuple, dtype) -> np.memmap:
    if path.exists():
        return open_npy(path, shape, dtype)  # a short or reshaped file is refused
    return create_npy(path, shape, dtype)


def stage_generate(run: Run) -> dict:
    """Generate the run's sample set: images.npy, PNG files and a grid."""
    model = run.model()
    n = run.cfg.sampling.n_images
    prompts = run.family.generation_prompts(run.dataset.class_names, run.cfg.model, n)
    images = generate_into(run.family, model, run.cfg, run.paths.gen, n, run.progress,
                           prompts=prompts)
    png_dir = run.paths.gen / "png"
    if not (png_dir / f"{n - 1:06d}.png").exists():
        save_pngs(torch.from_numpy(images), png_dir)
    save_grid(torch.from_numpy(images[:100]), run.paths.gen / "grid.png", nrow=10)
    out = {"n_images": n, "grid": str(run.paths.gen / "grid.png")}
    if prompts is not None:
        out["per_prompt"] = str(figures.samples_per_prompt(images, prompts,
                                                           run.paths.gen / "prompts.png"))
    return out
