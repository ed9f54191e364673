"""A run: its directory, its resolved config, and what every stage reads from them.

A stage is a plain function of a :class:`Run` and skips what is already done, so ``dtrak
run`` can be interrupted and started again. The run resolves once what all stages share:
the data set, the model family, the device and dtype (``runtime``), the executor of its
farms, and the attribution :class:`~dtrak.methods.Context`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..artefacts import digest, load_npy, open_npy, save_json
from ..config import Config, diff_configs, load_config, save_config, to_dict
from ..data import Dataset, Split, load_dataset, metadata_captions
from ..families import ModelFamily, get_family
from ..farm import Executor, make_executor
from ..methods import Context
from ..paths import RunPaths
from ..runtime import Placement, placement, set_threads
from .check import check_config

log = logging.getLogger(__name__)

__all__ = ["RESULT_NEUTRAL_KEYS", "Run", "RunConfigError", "data_content", "open_run"]


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
    # their artefacts sit in folders named by their settings; only scores and results go
    "das": ("scores", "results", "report"),
    "influence": ("scores", "results", "report"),
    # runtime.dtype (the only key of the section that changes results): what models compute
    # after training; trained models stay
    "runtime": ("gen", "features", "scores", "lds/truth", "pool/truth", "results",
                "counterfactual", "report"),
}


# Keys that choose what to compute, where or how fast, never what a result is: changing them
# does not make a run's saved outputs stale.
RESULT_NEUTRAL_KEYS = frozenset({
    "name", "stages", "attribution.methods", "attribution.targets",
    "attribution.batch_size", "attribution.gradients", "attribution.clip_path",
    "attribution.store_shard_rows", "influence.batch_size",
    "sampling.batch_size",
    # more counterfactual targets keep the earlier ones (a prefix of one seeded permutation)
    "counterfactual.methods", "counterfactual.n_targets",
    "runtime.device", "runtime.executor", "runtime.workers",
    "runtime.threads", "runtime.ray_address", "runtime.num_cpus", "runtime.num_gpus",
})


@dataclass
class Run:
    """A run directory and its resolved config. Stages read and write through ``paths``."""

    paths: RunPaths
    cfg: Config
    progress: bool = True

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
        if not self.paths.data_content.exists():
            _record_content(self.paths, ds)
        if self.paths.data_content.exists():
            saved = json.loads(self.paths.data_content.read_text())
            changed = [k for k, v in data_content(ds).items() if saved.get(k) != v]
            if changed:
                raise RunConfigError(
                    f"the {' and '.join(changed)} images of {self.paths.root} differ from the "
                    f"ones its results were made from ({self.paths.data_content}): images "
                    "changed on disk; restore them or use a new run directory")
        return ds

    @cached_property
    def family(self) -> ModelFamily:
        return get_family(self.cfg.model.family)

    @cached_property
    def raw_train_examples(self):
        """The training examples as the family takes them (images, or captioned images)."""
        ds = self.dataset
        return self.family.examples(ds.train.images, ds.train.labels, ds.class_names,
                                    self.cfg.model, captions=self.captions(ds.train))

    @cached_property
    def train_examples(self):
        """The training examples as every stage reads them: the family's cached encodings
        (``RUN/cache/train``, with those of the mirrored images for ``train.hflip``), or
        the raw examples for a family with nothing to cache."""
        return self.cached_examples("train", self.raw_train_examples,
                                    flips=self.cfg.train.hflip)

    @property
    def train_cache(self) -> Path | None:
        """The cache folder of the training examples (None: the family caches nothing)."""
        if self.train_examples is self.raw_train_examples:
            return None
        return self.paths.cache / "train"

    def cached_examples(self, set_name: str, examples, flips: bool = False):
        """A set's examples read from its encoding cache, ``RUN/cache/<set>`` (see
        :meth:`~dtrak.families.ModelFamily.cached_examples`)."""
        return self.family.cached_examples(examples, self.cfg.model,
                                           self.paths.cache / set_name, flips=flips,
                                           device=self.placement.device)

    def captions(self, split: Split) -> list[str] | None:
        """The captions of a split's images from the metadata.jsonl of an image-folder
        data set (None: none there, or a family that takes no text: class captions)."""
        d = self.cfg.data
        if (d.name not in ("imagefolder", "artbench") or split.files is None or d.root is None
                or not self.family.takes_text):
            return None
        return metadata_captions(split.files, d.root)

    @cached_property
    def placement(self) -> Placement:
        return placement(self.cfg.runtime)

    def executor(self, progress: bool | None = None) -> Executor:
        return make_executor(self.cfg.runtime, self.progress if progress is None else progress)

    def load_model(self, directory: Path) -> torch.nn.Module:
        """A saved model of the run's family, on the run's device and dtype (eval mode)."""
        return self.placement.put(self.family.load(directory))

    def model(self) -> torch.nn.Module:
        """The trained full model (eval mode, on the run's device)."""
        unet_dir = self.paths.model / "unet"
        if not unet_dir.exists():
            raise FileNotFoundError(
                f"no trained model in {self.paths.model}; run `dtrak train --out "
                f"{self.paths.root}` first"
            )
        return self.load_model(unet_dir)

    @cached_property
    def context(self) -> Context:
        """The attribution context of the run (targets cut to ``attribution.n_targets``)."""
        ds = self.dataset
        n = self.cfg.attribution.n_targets
        fam, mc = self.family, self.cfg.model
        val_captions = self.captions(ds.val)
        sets = {"val": self.cached_examples("val", fam.examples(
            ds.val.images[:n], ds.val.labels[:n], ds.class_names, mc,
            captions=None if val_captions is None else val_captions[:n]))}
        trajectories, sampler_ts = {}, None
        pixels = {"train": ds.train.images, "val": ds.val.images[:n]}
        gen = self.paths.gen
        if _generated(gen):
            images = torch.from_numpy(load_npy(gen / "images.npy")[:n])
            pixels["gen"] = images
            prompts = gen / "prompts.json"
            captions = (json.loads(prompts.read_text())[: len(images)] if prompts.exists()
                        else None)
            sets["gen"] = images if captions is None else self.cached_examples(
                "gen", fam.examples(images, None, ds.class_names, mc, captions=captions))
            if (gen / "trajectory.npy").exists():
                trajectories["gen"] = torch.from_numpy(
                    open_npy(gen / "trajectory.npy", mode="r")[:n].astype(np.float32))
            if (gen / "meta.json").exists():
                sampler_ts = json.loads((gen / "meta.json").read_text()).get("timesteps")
        return Context(self.cfg, self.family, self.train_examples, sets, self.paths.model / "unet",
                       self.paths.features, paths=self.paths, placement=self.placement,
                       trajectories=trajectories, sampler_timesteps=sampler_ts,
                       progress=self.progress, images=pixels)

    def target_sets(self) -> list[str]:
        """The configured target sets, each checked to exist."""
        missing = [s for s in self.cfg.attribution.targets if s not in self.context.sets]
        if missing:
            raise FileNotFoundError(
                f"target set(s) {', '.join(missing)} not available in {self.paths.root}: "
                "run `dtrak generate` (to the end) first for gen"
            )
        return list(self.cfg.attribution.targets)


def data_content(ds: Dataset) -> dict[str, str]:
    """Digests of the training and validation images (what every result was made from)."""
    return {"train": digest(ds.train.images), "val": digest(ds.val.images)}


def _record_content(paths: RunPaths, ds: Dataset) -> None:
    """Write the images' digests the first time a stage resolves the data set (a run made
    before they were recorded, and left read-only, is opened without them)."""
    try:
        paths.data.mkdir(parents=True, exist_ok=True)
        save_json(paths.data_content, data_content(ds))
    except OSError as e:
        log.warning("cannot record the image digests in %s: %s", paths.data_content, e)


def _generated(gen: Path) -> bool:
    """Whether ``gen`` holds a finished set of generated images (an interrupted generation
    is not a target set: its unwritten rows are zeros)."""
    done = gen / "done.npy"
    return (gen / "images.npy").exists() and (not done.exists() or bool(load_npy(done).all()))


def open_run(out: str | Path, cfg: Config | None = None, overwrite: bool = False,
             progress: bool = True) -> Run:
    """Open (or create) the run at ``out``.

    With ``cfg`` None the saved config is used. A different ``cfg`` for an existing run is
    refused with the list of differing keys, unless ``overwrite``: then the outputs that
    depend on the changed sections are deleted and the new config is saved. Saved configs
    are compared after resolving them (keys added since they were written take defaults).
    """
    paths = RunPaths(Path(out))
    if cfg is None:
        if not paths.config.exists():
            raise FileNotFoundError(
                f"{paths.root} is not a run directory (no config.json); give a config, "
                "e.g. `dtrak run configs/tiny.toml --out RUN`"
            )
        cfg = load_config(paths.config)
    check_config(cfg)
    if paths.config.exists():
        saved = to_dict(load_config(paths.config))
        diff = [k for k in diff_configs(saved, cfg) if k not in RESULT_NEUTRAL_KEYS]
        if diff and _holds_results(paths):
            if not overwrite:
                raise RunConfigError(
                    f"{paths.root} was made with a different config (keys: {', '.join(diff)}); "
                    "use another --out directory, or --overwrite to recompute what they affect"
                )
            _remove_stale(paths, diff)
    if not paths.config.exists() or to_dict(load_config(paths.config)) != to_dict(cfg):
        # written only when it changes: read-only commands work on a read-only run
        paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)
    set_threads(cfg.runtime.threads)
    return Run(paths, cfg, progress)


def _holds_results(paths: RunPaths) -> bool:
    """Whether the run has anything but its config (a first command that failed before any
    stage wrote a file leaves only the config, which a corrected retry may replace)."""
    keep = {paths.config.resolve(), (paths.root / "stages.json").resolve()}
    return any(p.is_file() and p.resolve() not in keep for p in paths.root.rglob("*"))


def _remove_stale(paths: RunPaths, diff: list[str]) -> None:
    sections = {k.split(".")[0] for k in diff}
    stale = sorted({d for s in sections for d in _DEPENDENTS.get(s, ())})
    for name in stale:
        target = paths.root / name
        if target.exists():
            log.warning("config changed (%s): removing %s", ", ".join(sorted(sections)), target)
            shutil.rmtree(target)
