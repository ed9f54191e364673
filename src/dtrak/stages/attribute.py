"""Attribute images to a model's training data: ``dtrak attribute --model M --data D IMG...``.

The everyday question, "which training images made this?", for a diffusion model saved the
way diffusers saves it and a folder of its training images. Three layouts name the model and
its noise schedule (:func:`resolve_model`):

- a pipeline folder (``DDPMPipeline(unet, scheduler).save_pretrained(DIR)``: model_index.json,
  unet/, scheduler/): the UNet and its own scheduler;
- a bare model folder (config.json + safetensors) with ``scheduler=DIR``, a diffusers
  scheduler folder (scheduler_config.json);
- a dtrak run (``run=RUN``): RUN/model/unet, the schedule of the run's config, its training
  images when no data folder is given, the lambda its LDS chose and its finished training
  features when they fit.

The schedule (betas, number of timesteps, prediction type) is the model's own wherever a
noise level is computed; a bare model folder without one is refused, never given a default
schedule (except a dtrak run's own RUN/model/unet, whose run config says it). Models that
predict v or x0 are attributed through their epsilon prediction (see
:class:`~dtrak.families.unet2d.UNet2DAdapter`). A class-conditional model gets the labels of
the data's class folders, and each target the class of its folder or ``target_class``.

The training features are computed once into a cache (a feature store keyed by the model's
weights, the data, the schedule and the feature settings) and reused by every later call, so
attributing a new image costs one gradient and one small solve.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ModelConfig, load_config
from ..data import load_image_folder
from ..families import get_family
from ..families.unet2d import LabelledImages
from ..featurize import FeatureSpec, featurize_into, finished_store
from ..lambdas import chosen_lambdas, prior_lambda_rel
from ..noise import ScheduleConstants
from ..outputs import get_output
from ..paths import RunPaths
from ..runtime import resolve_device
from ..scoring import KernelSolver
from ..store import FeatureStore, ShardedStore
from ..streaming import StreamingKernel, stream_scores
from .run import open_run

log = logging.getLogger(__name__)

__all__ = ["Attribution", "ModelSource", "attribute_images", "attribution_spec",
           "default_cache_dir", "resolve_model"]

_LAYOUTS = ("a pipeline folder (model_index.json, unet/, scheduler/ as "
            "DDPMPipeline(unet, scheduler).save_pretrained(DIR) writes it), a model folder "
            "with --scheduler DIR (a diffusers scheduler folder, scheduler_config.json), or "
            "--run RUN (a dtrak run)")


@dataclass(frozen=True)
class Attribution:
    """Scores of one target: ``scores[N]`` over the training images (positive = helps)."""

    target: Path
    scores: np.ndarray
    train_paths: list[Path]
    train_images: torch.Tensor  # [N, C, H, W] in [-1, 1], shared by all targets of a call
    target_class: str | None = None  # the target's class (class-conditional models)
    lam_rel: float | None = None  # the ridge term used, relative to trace(Phi^T Phi)/N
    lam_from: str = ""  # where it came from: given, the run's LDS, the prior
    source: str = ""  # the model and its noise schedule, in words

    def top(self, k: int, opponents: bool = False) -> list[tuple[int, float, Path]]:
        order = np.argsort(self.scores, kind="stable")
        idx = order[:k] if opponents else order[::-1][:k]
        return [(int(i), float(self.scores[i]), self.train_paths[i]) for i in idx]


@dataclass(frozen=True)
class ModelSource:
    """A model to attribute: its weights folder, the diffusers scheduler of its noise levels,
    its family, which layout named it, and the dtrak run it belongs to (if any)."""

    model_dir: Path
    scheduler: Any
    family: str = "unet2d"
    layout: str = "pipeline"  # pipeline, model+scheduler, run, run model, config
    run: Path | None = None

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def describe(self) -> str:
        c = self.scheduler.config
        betas = "given betas" if c.get("trained_betas") is not None else f"{c.beta_schedule} betas"
        return (f"{self.model_dir} ({self.layout}): {betas}, T = {c.num_train_timesteps}, "
                f"{c.prediction_type} prediction")


def _run_config(root: Path) -> Config | None:
    """The config of the dtrak run at ``root``, or None when ``root`` is no run."""
    path = root / "config.json"
    try:
        d = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    if not (isinstance(d, dict) and isinstance(d.get("model"), dict) and "attribution" in d):
        return None  # e.g. a diffusers model's own config.json
    return load_config(path)


def _enclosing_run(model_dir: Path) -> Path | None:
    """The dtrak run a model folder lies in (RUN/model/unet, a checkpoint, a subset model)."""
    for parent in list(model_dir.resolve().parents)[:4]:
        if _run_config(parent) is not None:
            return parent
    return None


def _scheduler_folder(directory: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) of a scheduler given as its folder or as a pipeline folder."""
    if (directory / "scheduler" / "scheduler_config.json").is_file() and not (
            directory / "scheduler_config.json").is_file():
        return directory, "scheduler"
    return directory, None


def resolve_model(model: str | Path | None = None, scheduler: str | Path | None = None,
                  run: str | Path | None = None, model_cfg: ModelConfig | None = None
                  ) -> ModelSource:
    """Which weights and which noise schedule: see the module docstring for the layouts.

    ``model_cfg`` (Python only) gives the family, and the schedule of a bare model folder
    explicitly (its ``beta_schedule``, ``num_train_timesteps``, ``prediction_type``).
    """
    if model is not None and run is not None:
        raise ValueError("give the model (--model DIR) or a dtrak run (--run RUN), not both")
    if run is not None:
        root = Path(run)
        cfg = _run_config(root)
        if cfg is None:
            raise FileNotFoundError(f"{root} is not a dtrak run directory (no config.json "
                                    "with a model section); pass --model DIR for other models")
        if scheduler is not None:
            raise ValueError("--scheduler goes with --model; a dtrak run's noise schedule is "
                             f"the model section of {root / 'config.json'}")
        unet = RunPaths(root).model / "unet"
        if not (unet / "config.json").is_file():
            raise FileNotFoundError(f"no trained model in {unet}; run `dtrak train --out "
                                    f"{root}` first")
        family = get_family(cfg.model.family)
        return ModelSource(unet, family.scheduler(cfg.model), cfg.model.family, "run", root)
    if model is None:
        raise ValueError(f"name the model to attribute: {_LAYOUTS}")
    path = Path(model)
    family_name = model_cfg.family if model_cfg is not None else "unet2d"
    family = get_family(family_name)
    given = None
    if scheduler is not None:
        given = family.load_scheduler(*_scheduler_folder(Path(scheduler)))
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        if "unet" not in index or not (path / "unet" / "config.json").is_file():
            raise ValueError(
                f"pipeline folder {path} has no unet/ model (model_index.json lists "
                f"{', '.join(k for k in index if not k.startswith('_')) or 'nothing'}); dtrak "
                "attributes UNet pipelines such as DDPMPipeline and DDIMPipeline")
        if given is None and not (path / "scheduler" / "scheduler_config.json").is_file():
            raise FileNotFoundError(
                f"pipeline folder {path} has no scheduler/scheduler_config.json; pass "
                "--scheduler DIR with the noise schedule the model was trained with")
        sched = given if given is not None else family.load_scheduler(path, "scheduler")
        return ModelSource(path / "unet", sched, family_name, "pipeline folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers model at {path}: expected {_LAYOUTS}; a bare model folder holds "
            "config.json and diffusion_pytorch_model.safetensors")
    if given is not None:
        return ModelSource(path, given, family_name, f"model + scheduler {scheduler}")
    if model_cfg is not None:
        return ModelSource(path, family.scheduler(model_cfg), family_name, "model + config")
    root = _enclosing_run(path)
    if root is not None:
        cfg = _run_config(root)
        fam = get_family(cfg.model.family)
        return ModelSource(path, fam.scheduler(cfg.model), cfg.model.family,
                           f"model of the dtrak run {root}", root)
    raise ValueError(
        f"{path} is a model folder without its noise schedule: pass --scheduler DIR (a "
        "diffusers scheduler folder, scheduler_config.json) or give the pipeline folder "
        "(model_index.json, unet/, scheduler/, as DDPMPipeline(unet, scheduler)"
        ".save_pretrained(DIR) writes it); dtrak does not guess a schedule")


def attribution_spec(output: str = "square", n_timesteps: int | None = None,
                     proj_dim: int | None = None, projector: str | None = None,
                     run: str | Path | None = None) -> FeatureSpec:
    """The feature settings: those given, the rest from the run's ``attribution`` section
    (with ``run``, so its features and lambdas apply) or K = 10, k = 2048, gaussian."""
    cfg = _run_config(Path(run)) if run is not None else None
    if cfg is not None:
        a = cfg.attribution
        base = FeatureSpec(output=output, schedule=a.timesteps, n_timesteps=a.n_timesteps,
                           projector=a.projector, proj_dim=a.proj_dim, proj_seed=a.proj_seed,
                           noise_seed=a.noise_seed)
    else:
        base = FeatureSpec(output=output, n_timesteps=10, proj_dim=2048, projector="gaussian")
    given = {"n_timesteps": n_timesteps, "proj_dim": proj_dim, "projector": projector}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class _Examples:
    """Images with their names, and class labels when the model is class-conditional."""

    images: torch.Tensor
    paths: list[Path]
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None

    def examples(self):
        return self.images if self.labels is None else LabelledImages(self.images, self.labels)


def _folder_labels(root: Path, paths: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """Labels of images in class folders ``root/<class>/...``: sorted folder names -> 0..C-1."""
    if not root.is_dir():
        raise ValueError(f"a class-conditional model needs its training images in class "
                         f"folders ({root}/<class>/*.png); {root} is a file")
    first = [p.relative_to(root).parts for p in paths]
    loose = [root.joinpath(*parts) for parts in first if len(parts) < 2]
    if loose:
        raise ValueError(f"a class-conditional model needs its training images in class "
                         f"folders ({root}/<class>/*.png, classes in sorted order); "
                         f"{loose[0]} lies in {root} itself")
    names = sorted({parts[0] for parts in first})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[parts[0]] for parts in first], dtype=torch.long), names


def _training_set(source: ModelSource, data: str | Path | None, res: int, ch: int,
                  conditional: bool, progress: bool) -> _Examples:
    if data is not None:
        images, paths = load_image_folder(data, resolution=res, channels=ch)
        if not conditional:
            return _Examples(images, paths)
        labels, names = _folder_labels(Path(data), paths)
        return _Examples(images, paths, labels, names)
    if source.run is None:
        raise ValueError("--data is needed: the folder of the model's training images (or "
                         "--run RUN, whose training images are used)")
    ds = open_run(source.run, None, progress=progress).dataset
    paths = [Path(f"{source.run.name}:train[{i}]") for i in range(len(ds.train))]
    labels = torch.as_tensor(ds.train.labels, dtype=torch.long) if conditional else None
    return _Examples(ds.train.images, paths, labels, list(ds.class_names) if conditional
                     else None)


def _target_set(images: list[str | Path], res: int, ch: int, class_names: list[str] | None,
                target_class: str | None) -> _Examples:
    xs, paths = [], []
    for item in images:
        x, p = load_image_folder(item, resolution=res, channels=ch)
        xs.append(x)
        paths += p
    target = torch.cat(xs)
    if class_names is None:
        return _Examples(target, paths)
    index = {n: i for i, n in enumerate(class_names)}
    if target_class is not None:
        if target_class not in index and not (target_class.isdigit()
                                               and int(target_class) < len(class_names)):
            raise ValueError(f"--target-class {target_class!r} is none of the training "
                             f"classes: {', '.join(class_names)}")
        label = index.get(target_class, None)
        label = int(target_class) if label is None else label
        return _Examples(target, paths, torch.full((len(paths),), label, dtype=torch.long),
                         class_names)
    unknown = [p for p in paths if p.parent.name not in index]
    if unknown:
        raise ValueError(
            f"a class-conditional model needs each target's class: {unknown[0]} is in no class "
            f"folder ({', '.join(class_names)}); put the targets in folders named after the "
            "training classes, or pass --target-class NAME")
    labels = torch.tensor([index[p.parent.name] for p in paths], dtype=torch.long)
    return _Examples(target, paths, labels, class_names)


def _fingerprint(model_dir: Path, train: torch.Tensor, spec: FeatureSpec, family: str,
                 betas: torch.Tensor, extra: dict | None = None) -> str:
    """The training-feature cache key: contents only (model files, images, settings), no paths.

    The model directory's files are hashed by bytes (with their sorted relative names), the
    training images by the loaded tensor, so files replaced in place change the key and a
    moved but identical folder keeps it. ``extra`` (prediction type, labels) is hashed when
    given.
    """
    h = hashlib.blake2b(digest_size=10)
    for f in sorted(f for f in model_dir.rglob("*") if f.is_file()):
        fh = hashlib.blake2b()
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f.relative_to(model_dir).as_posix().encode() + b"\0" + fh.digest())
    h.update(str((tuple(train.shape), train.dtype)).encode())
    h.update(train.detach().cpu().contiguous().numpy().tobytes())
    h.update(betas.detach().cpu().to(torch.float64).numpy().tobytes())
    h.update(json.dumps({**spec.__dict__, "family": family}, sort_keys=True).encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dtrak" / "attribute"


def _run_lambda(run: Path, spec: FeatureSpec) -> tuple[float, str] | None:
    """The relative lambda the run's LDS chose (held out) for the kernel of ``spec``."""
    cfg = _run_config(run)
    chosen = chosen_lambdas(RunPaths(run).results / "lds.json", relative=True)
    if cfg is None or not chosen:
        return None
    out = get_output(spec.output).name
    names = {"loss": ["trak"], "square": ["dtrak"]}.get(out, []) + [f"kernel-{out}"]
    if spec.n_timesteps != cfg.attribution.n_timesteps:
        names = [f"{n}@{spec.n_timesteps}" for n in names]
    for name in names:
        for targets in ("gen", "val"):
            if (name, targets) in chosen:
                return chosen[(name, targets)], f"the LDS of {run} ({name}, {targets} targets)"
    return None


def _streamed_scores(store: FeatureStore | ShardedStore, targets: np.ndarray, rel: float,
                     directory: Path) -> np.ndarray:
    """Scores ``[T, N]`` float32 by one pass over ``store`` with its cached factorisation."""
    kernel = StreamingKernel.prepare(store, directory)
    out = np.empty((len(targets), store.n), dtype=np.float32)
    stream_scores(kernel, store, targets, rel * kernel.trace_scale, out=out)
    return out


def attribute_images(
    model_dir: str | Path | None,
    data: str | Path | None,
    images: list[str | Path],
    spec: FeatureSpec | None = None,
    model_cfg: ModelConfig | None = None,
    lam_rel: float | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    device: str = "auto",
    scheduler: str | Path | None = None,
    run: str | Path | None = None,
    target_class: str | None = None,
    stream: bool = False,
) -> list[Attribution]:
    """Score every training image for each image in ``images``.

    Args:
        model_dir: a pipeline folder (model_index.json, unet/, scheduler/) or a model folder
            (config.json + safetensors; needs ``scheduler``, unless it is a dtrak run's).
            None with ``run``.
        data: the folder of training images (recursive; sorted paths are the columns; class
            folders ``data/<class>/`` for a class-conditional model). None with ``run``: the
            run's training split.
        images: target image files or folders.
        spec: the features (output function, timesteps, projection); default
            :func:`attribution_spec` (D-TRAK, the run's settings with ``run``).
        model_cfg: the family, and the noise schedule of a bare model folder (explicitly).
        lam_rel: ridge term relative to trace(Phi^T Phi)/N (default: what the run's LDS
            chose, else a per-output prior).
        cache_dir: where training features are cached (default ~/.cache/dtrak/attribute).
        device: auto, cpu, cuda or cuda:N.
        scheduler: a diffusers scheduler folder (scheduler_config.json) for a bare model.
        run: a dtrak run directory instead of ``model_dir``.
        target_class: the class of every target (a class name or index), for a
            class-conditional model whose targets are not in class folders.
        stream: score by one pass over the training features on disk
            (:mod:`dtrak.streaming`) instead of an in-memory solver: memory O(k^2 + block)
            whatever N, the kernel factorised once and cached beside the features; the same
            scores to float64 rounding.
    """
    source = resolve_model(model_dir, scheduler, run, model_cfg)
    spec = spec or attribution_spec(run=run)
    family = get_family(source.family)
    model = family.load(source.model_dir).to(resolve_device(device))
    sched = ScheduleConstants.from_scheduler(source.scheduler)
    if spec.n_timesteps > sched.T:
        raise ValueError(f"{spec.n_timesteps} timesteps asked but the model's schedule has "
                         f"T = {sched.T}")
    adapter = family.bind(model, source.prediction_type, sched)
    conditional = family.conditioning(model) is not None
    ch, res, _ = family.sample_shape(model)
    train = _training_set(source, data, res, ch, conditional, progress)
    if conditional and (n := model.config.num_class_embeds) and len(train.class_names) > n:
        raise ValueError(f"{len(train.class_names)} class folders but the model knows {n} "
                         f"classes ({', '.join(train.class_names)})")
    target = _target_set(images, res, ch, train.class_names, target_class)
    store, model_id = None, "attribute"
    if run is not None and data is None:  # the run's own finished training features
        store = finished_store(adapter, len(train.images),
                               RunPaths(run).features("full", "train", spec.name), spec,
                               sched, "full", "train")
        model_id = "attribute" if store is None else "full"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    extra = {}
    if source.prediction_type != "epsilon":
        extra["prediction_type"] = source.prediction_type
    if train.labels is not None:
        extra["labels"] = train.labels.tolist()
    key = _fingerprint(source.model_dir, train.images, spec, source.family, sched.betas, extra)
    engine = "hooks" if spec.projector == "kron" else "vmap"  # equal to rounding otherwise
    if store is None:
        store = featurize_into(adapter, train.examples(), cache / key / "train", spec, sched,
                               model_id, "train", batch_size=batch_size, progress=progress,
                               gradients=engine)
    phi_train = None if stream else store.load()  # streamed: read block by block
    # targets: a throwaway store per call (targets are few; the training set is the cost)
    th = hashlib.blake2b(target.images.numpy().tobytes(), digest_size=10)
    if target.labels is not None:
        th.update(target.labels.numpy().tobytes())
    tstore = featurize_into(adapter, target.examples(),
                            cache / key / f"targets-{model_id}-{th.hexdigest()}", spec, sched,
                            model_id, "targets", batch_size=batch_size, progress=False,
                            gradients=engine)
    if lam_rel is not None:
        rel, lam_from = lam_rel, "given"
    elif run is not None and (chosen := _run_lambda(Path(run), spec)) is not None:
        rel, lam_from = chosen
    else:
        rel, lam_from = prior_lambda_rel(spec.output), f"the prior for {spec.output}"
    if stream:
        scores = _streamed_scores(store, tstore.load(), rel, cache / key / f"kernel-{model_id}")
    else:
        on = resolve_device(device)
        solver = KernelSolver(phi_train, device=None if on.type == "cpu" else on)
        scores = solver.scores(tstore.load(), rel * solver.trace_scale)
    names = target.class_names
    return [Attribution(p, s, train.paths, train.images,
                        target_class=None if names is None else names[int(lab)],
                        lam_rel=float(rel), lam_from=lam_from, source=source.describe())
            for p, s, lab in zip(target.paths, scores,
                                 target.labels if target.labels is not None
                                 else [0] * len(target.paths), strict=True)]
