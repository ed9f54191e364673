"""Stages of a run: thin wrappers that resolve paths, check the saved config, write outputs.

Each stage is a plain function of a :class:`Run` (a run directory and its resolved config)
and skips what is already done, so ``dtrak run`` can be interrupted and started again.
The computing cores live in their own modules (data, train, sampling, featurize, scoring,
lds); tests call those directly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config, diff_configs, load_config, save_config
from .data import Dataset, load_dataset, save_split_indices
from .images import save_grid, save_pngs
from .model import count_parameters, load_unet
from .paths import RunPaths
from .sampling import sample_images
from .train import train_model

log = logging.getLogger(__name__)

__all__ = ["Run", "RunConfigError", "open_run", "STAGES", "run_stages"]


class RunConfigError(ValueError):
    """A run directory holds results of a different configuration."""


# Which outputs become stale when a config section changes (used by --overwrite).
_DEPENDENTS = {
    "data": ("data", "model", "gen", "features", "scores", "lds", "pool", "results",
             "counterfactual", "report"),
    "model": ("model", "gen", "features", "scores", "lds", "pool", "results", "counterfactual",
              "report"),
    "train": ("model", "gen", "features", "scores", "lds", "pool", "results", "counterfactual",
              "report"),
    "sampling": ("gen", "features", "scores", "results", "counterfactual", "report"),
    "attribution": ("features", "scores", "results", "counterfactual", "report"),
    "lds": ("lds", "pool", "results", "report"),
    "counterfactual": ("counterfactual", "report"),
}


# Keys that choose what to compute or how fast, never what a result is: changing them
# does not make a run's saved outputs stale.
RESULT_NEUTRAL_KEYS = frozenset({
    "name", "stages", "torch_threads", "attribution.methods", "attribution.targets",
    "attribution.batch_size", "attribution.clip_path", "sampling.batch_size", "lds.workers",
    "counterfactual.methods",
})


@dataclass
class Run:
    """A run directory and its resolved config. Stages read and write through ``paths``."""

    paths: RunPaths
    cfg: Config
    progress: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def dataset(self) -> Dataset:
        ds = load_dataset(self.cfg.data)
        if self.paths.splits.exists():
            saved = json.loads(self.paths.splits.read_text())
            if list(saved["train"]) != ds.train.source_indices.tolist():
                raise RunConfigError(
                    f"the training split of {self.paths.root} differs from the one saved in "
                    f"{self.paths.splits} (data changed on disk?); use a new run directory"
                )
        return ds

    def model(self):
        """The trained full model (eval mode)."""
        unet_dir = self.paths.model / "unet"
        if not unet_dir.exists():
            raise FileNotFoundError(
                f"no trained model in {self.paths.model}; run `dtrak train --out "
                f"{self.paths.root}` first"
            )
        return load_unet(unet_dir)


def open_run(out: str | Path, cfg: Config | None = None, overwrite: bool = False,
             progress: bool = True) -> Run:
    """Open (or create) the run at ``out``.

    With ``cfg`` None the saved config is used. A different ``cfg`` for an existing run is
    refused with the list of differing keys, unless ``overwrite``: then the outputs that
    depend on the changed sections are deleted and the new config is saved.
    """
    paths = RunPaths(Path(out))
    if cfg is None:
        if not paths.config.exists():
            raise FileNotFoundError(
                f"{paths.root} is not a run directory (no config.json); give a config, "
                "e.g. `dtrak run configs/tiny.toml --out RUN`"
            )
        cfg = load_config(paths.config)
    if paths.config.exists():
        saved = json.loads(paths.config.read_text())
        diff = [k for k in diff_configs(saved, cfg) if k not in RESULT_NEUTRAL_KEYS]
        if diff:
            if not overwrite:
                raise RunConfigError(
                    f"{paths.root} was made with a different config (keys: {', '.join(diff)}); "
                    "use another --out directory, or --overwrite to recompute what they affect"
                )
            _remove_stale(paths, diff)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return Run(paths, cfg, progress)


def _remove_stale(paths: RunPaths, diff: list[str]) -> None:
    sections = {k.split(".")[0] for k in diff}
    stale = sorted({d for s in sections for d in _DEPENDENTS.get(s, ())})
    for name in stale:
        target = paths.root / name
        if target.exists():
            log.warning("config changed (%s): removing %s", ", ".join(sorted(sections)), target)
            shutil.rmtree(target)


# ----------------------------------------------------------------------------- stages


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


def stage_train(run: Run) -> dict:
    """Train the full model on the whole training split (resumes from checkpoints)."""
    ds = run.dataset
    res = train_model(ds.train.images, run.cfg.model, run.cfg.train, run.paths.model,
                      progress=run.progress, desc="train full model")
    model = run.model()
    return {"steps": res.steps, "final_loss": res.final_loss,
            "steps_per_second": res.steps_per_second,
            "parameters": count_parameters(model)}


def generate_into(model, run_cfg: Config, directory: Path, n: int, progress: bool = True,
                  desc: str = "generate", keep_trajectory: bool | None = None) -> np.ndarray:
    """Generate images 0..n-1 into ``directory`` (resumable by batch); returns [n, C, H, W]."""
    sc = run_cfg.sampling
    keep = sc.save_trajectory if keep_trajectory is None else keep_trajectory
    directory.mkdir(parents=True, exist_ok=True)
    c, s = model.config.in_channels, model.config.sample_size
    imgs = _memmap(directory / "images.npy", (n, c, s, s), np.float32)
    done = _memmap(directory / "done.npy", (n,), np.uint8)
    traj = (_memmap(directory / "trajectory.npy", (n, sc.steps, c, s, s), np.float16)
            if keep else None)
    todo = np.flatnonzero(done == 0)
    bar = tqdm(total=n, initial=n - len(todo), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(todo), sc.batch_size):
        ids = todo[start:start + sc.batch_size]
        out = sample_images(model, run_cfg.model, sc, [int(i) for i in ids], keep)
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
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != tuple(shape):
            raise RunConfigError(f"{path} has shape {arr.shape}, expected {shape}; "
                                 "remove it or use --overwrite")
        return arr
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


def stage_generate(run: Run) -> dict:
    """Generate the run's sample set: images.npy, PNG files and a grid."""
    model = run.model()
    n = run.cfg.sampling.n_images
    images = generate_into(model, run.cfg, run.paths.gen, n, run.progress)
    png_dir = run.paths.gen / "png"
    if not (png_dir / f"{n - 1:06d}.png").exists():
        save_pngs(torch.from_numpy(images), png_dir)
    save_grid(torch.from_numpy(images[:100]), run.paths.gen / "grid.png", nrow=10)
    return {"n_images": n, "grid": str(run.paths.gen / "grid.png")}


STAGES: dict[str, Callable[[Run], dict]] = {
    "data": stage_data,
    "train": stage_train,
    "generate": stage_generate,
}


def run_stages(run: Run, stages: tuple[str, ...] | None = None,
               echo: Callable[[str], None] = log.info) -> dict[str, dict]:
    """Run the configured stages in order; each skips what is already done."""
    stages = stages or run.cfg.stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    results = {}
    for name in stages:
        echo(f"[{name}]")
        t0 = time.time()
        results[name] = STAGES[name](run)
        echo(f"[{name}] done in {time.time() - t0:.1f} s: "
             f"{json.dumps(results[name], default=str)[:400]}")
    (run.paths.root / "stages.json").write_text(json.dumps(results, indent=2, default=str))
    return results




# ----------------------------------------------------------------------------- attribution


def context(run: Run):
    """The attribution :class:`~dtrak.methods.Context` of a run (targets cut to n_targets)."""
    from .methods import Context

    if "context" in run._cache:
        return run._cache["context"]
    ds = run.dataset
    n = run.cfg.attribution.n_targets
    sets = {"val": ds.val.images[:n]}
    trajectories = {}
    gen_file = run.paths.gen / "images.npy"
    if gen_file.exists():
        sets["gen"] = torch.from_numpy(np.load(gen_file)[:n])
        traj = run.paths.gen / "trajectory.npy"
        if traj.exists():
            trajectories["gen"] = torch.from_numpy(
                np.load(traj, mmap_mode="r")[:n].astype(np.float32))
    ctx = Context(run.cfg, ds.train.images, sets, run.paths.model / "unet",
                  lambda m, s, f: run.paths.features(m, s, f), progress=run.progress,
                  trajectories=trajectories, run_dir=run.paths.root)
    run._cache["context"] = ctx
    return ctx


def _target_sets(run: Run, ctx) -> list[str]:
    missing = [s for s in run.cfg.attribution.targets if s not in ctx.sets]
    if missing:
        raise FileNotFoundError(
            f"target set(s) {', '.join(missing)} not available in {run.paths.root}: "
            "run `dtrak generate` first for gen"
        )
    return list(run.cfg.attribution.targets)


def stage_featurize(run: Run) -> dict:
    """Features of the training set and every target set, for each configured output."""
    from .methods import get_method

    ctx = context(run)
    K = run.cfg.attribution.n_timesteps
    # (K, output) pairs: the configured outputs, then what each method needs at its own K
    wanted = [(K, o) for o in run.cfg.attribution.outputs]
    for name in run.cfg.attribution.methods:
        method = get_method(name)
        wanted += [(method.n_timesteps or K, o) for o in method.outputs]
    by_k: dict[int, list[str]] = {}
    for k, output in dict.fromkeys(wanted):
        by_k.setdefault(k, []).append(output)
    done = {}
    for k, outputs in by_k.items():
        kctx = ctx.at_timesteps(k)
        for set_name in ["train", *_target_sets(run, ctx)]:
            # all output functions of one K together: one forward pass per batch
            for output, feats in kctx.prefetch(set_name, outputs).items():
                done[f"{set_name}/{kctx.spec(output).name}"] = list(feats.shape)
    return done


def featurize_shard(run: Run, shard: tuple[int, int], sets: list[str] | None = None,
                    outputs: list[str] | None = None) -> dict:
    """One shard worker's part of the featurize stage (``dtrak featurize --shard i/N``)."""
    from .featurize import featurize_into

    ctx = context(run)
    sets = sets or ["train", *_target_sets(run, ctx)]
    outputs = outputs or list(run.cfg.attribution.outputs)
    left = {}
    for output in outputs:
        spec = ctx.spec(output)
        for set_name in sets:
            store = featurize_into(ctx.adapter, ctx.examples(set_name),
                                   run.paths.features("full", set_name, spec.name), spec,
                                   ctx.sched, "full", set_name, run.cfg.attribution.batch_size,
                                   shard=shard, progress=run.progress)
            left[f"{set_name}/{spec.name}"] = int((store.done == 0).sum())
    return {"shard": f"{shard[0]}/{shard[1]}", "examples_left_in_store": left}


def _chosen_lambdas(run: Run) -> dict[tuple[str, str], float]:
    path = run.paths.results / "lds.json"
    if not path.exists():
        return {}
    recs = json.loads(path.read_text())["records"]
    return {(r["method"], r["targets"]): r["lambda"] for r in recs
            if r.get("lambda_selection") == "heldout" and r.get("lambda") is not None}


def write_scores(run: Run, method_name: str, set_name: str, scores: np.ndarray, meta: dict
                 ) -> Path:
    path = run.paths.scores(method_name, set_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, scores.astype(np.float32))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=float))
    return path


def stage_score(run: Run) -> dict:
    """Score matrices [targets, train] for each configured method and target set.

    Lambda: the one LDS selected on held-out targets when ``results/lds.json`` exists at the
    time a matrix is first computed, else the prior of :func:`dtrak.methods.default_lambda`;
    the choice is recorded in its ``.json``. Existing matrices are kept (delete one, or use
    ``--overwrite`` with a changed config, to recompute it).
    """
    from .methods import default_lambda, get_method

    ctx = context(run)
    chosen = _chosen_lambdas(run)
    a = run.cfg.attribution
    out = {}
    for name in a.methods:
        method = get_method(name)
        for set_name in _target_sets(run, ctx):
            if not method.applies_to(set_name):
                continue
            path = run.paths.scores(name, set_name)
            if path.exists():  # done: later stages (counterfactual) rely on these exact scores
                out[f"{name}/{set_name}"] = str(path)
                continue
            lam = chosen.get((name, set_name))
            how = "lds-heldout" if lam is not None else "prior"
            if lam is None:
                lam = default_lambda(ctx, method)
            scores = method.score(ctx, set_name, lam)
            meta = {"method": name, "targets": set_name, "lambda": lam,
                    "lambda_selection": how if method.uses_lambda else None,
                    "shape": list(scores.shape),
                    "n_timesteps": method.n_timesteps or a.n_timesteps,
                    "timesteps": a.timesteps, "proj_dim": a.proj_dim, "projector": a.projector,
                    "outputs": list(method.outputs), "sign": method.sign}
            path = write_scores(run, name, set_name, scores, meta)
            out[f"{name}/{set_name}"] = str(path)
    return out


STAGES.update({"featurize": stage_featurize, "score": stage_score})


def _stage_lds(run: Run) -> dict:
    from .evaluation import stage_lds

    return stage_lds(run)


STAGES["lds"] = _stage_lds


def stage_report(run: Run) -> dict:
    """Write RUN/report/index.html from the saved artefacts."""
    from .report import write_report

    ds = run.dataset
    n = run.cfg.attribution.n_targets
    methods = [m for m in run.cfg.attribution.methods if run.paths.scores(m, "gen").exists()
               or run.paths.scores(m, "val").exists()]
    path = write_report(run.paths.root, train_images=ds.train.images.numpy(),
                        val_images=ds.val.images[:n].numpy(),
                        methods=methods or ("trak", "dtrak"))
    return {"report": str(path)}


STAGES["report"] = stage_report


def _stage_counterfactual(run: Run) -> dict:
    from .counterfactual import stage_counterfactual

    return stage_counterfactual(run)


STAGES["counterfactual"] = _stage_counterfactual
