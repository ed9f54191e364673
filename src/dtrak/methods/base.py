"""What a method is, and the context it reads: features, solvers and models of a run.

A method turns a target set (``val``, ``gen`` or any registered set) into a score matrix
``[targets, N_train]``; positive means the training example helps the target (lowers its
loss). Methods with a ridge term take ``lam`` (absolute); :func:`default_lambda` gives the
value used when no LDS has chosen one. The numerical cores live in :mod:`dtrak.scoring`.

Methods compute scores from features and saved tables only. A method that needs retrained
models says so with :class:`PoolNeed`; the stages train those models and write their loss
tables before the method runs (:mod:`dtrak.stages.pools`), so scoring never trains.

The :class:`Context` computes missing features on demand (resumably, via the store). Its
answers are functions of their arguments alone: features are keyed by (model id, set,
feature spec), solvers by (model id, spec), and a model id names one model directory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .. import scoring
from ..config import Config
from ..families import DiffusionAdapter, ModelFamily
from ..featurize import FeatureSpec, featurize_into, featurize_many
from ..lambdas import lambda_grid, prior_lambda_rel
from ..noise import ScheduleConstants
from ..paths import RunPaths
from ..runtime import Placement

__all__ = ["Context", "Method", "PoolNeed", "default_lambda", "lambda_scale",
           "method_lambda_grid"]


@dataclass(frozen=True)
class PoolNeed:
    """Retrained models a method reads (the run's attribution pool, ``RUN/pool``).

    ``members=None``: every pool subset with every seed; ``members=n``: the first ``n``
    subsets, first seed. ``losses``: also their losses on the targets (``RUN/pool/truth``).
    """

    members: int | None = None
    losses: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    sign: str
    score: Callable  # (ctx, set_name, lam) -> [T, N]
    uses_lambda: bool = False
    outputs: tuple[str, ...] = ()  # feature outputs of the full model it needs
    output: str | None = None  # the kernel's output function, for lambda defaults
    sets: tuple[str, ...] | None = None  # target sets it applies to (None: all)
    kernel: bool = False  # plain TRAK-style kernel: LDS over lambda straight from the solver
    n_timesteps: int | None = None  # K of its features (None: attribution.n_timesteps)
    pool: PoolNeed | None = None  # retrained models it reads (trained by the stages)
    # FeatureSpec changes of the features its kernel is built on, e.g. (("unit", True),)
    feature: tuple[tuple[str, object], ...] = ()
    # the scale its lambda is relative to (None: trace(Phi^T Phi)/N of its kernel), e.g. the
    # mean curvature eigenvalue of an influence method's damping; such a lambda is always
    # chosen on the relative grid
    lambda_scale: Callable | None = None  # (ctx) -> float
    lambda_prior: float | None = None  # prior relative lambda (None: by its output function)
    config: tuple[str, ...] = ()  # config sections of its own that its scores depend on

    def applies_to(self, set_name: str) -> bool:
        return self.sets is None or set_name in self.sets

    def context(self, ctx: Context) -> Context:
        """The context this method reads its features from (its own K, if it has one)."""
        return ctx if self.n_timesteps is None else ctx.at_timesteps(self.n_timesteps)

    def spec(self, ctx: Context) -> FeatureSpec:
        """The feature spec of its kernel's features (``output`` with ``feature`` changes)."""
        return self.context(ctx).spec(self.output, **dict(self.feature))


_CKPT_ID = re.compile(r"ckpt-(\d+)$")
_POOL_ID = re.compile(r"pool-m(\d+)$")


@dataclass
class Context:
    """What methods read: a run's config, examples, models and (lazily computed) features.

    ``train`` holds the training examples and ``sets`` maps a target-set name to its
    examples; ``full_model_dir`` is the attributed model. Model ids: ``full``,
    ``ckpt-<step>`` (its training checkpoints) and ``pool-m<MMM>`` (pool subset models,
    first seed; needs ``paths``). Features go to ``feature_dir(model_id, set, feature name)``.
    """

    cfg: Config
    family: ModelFamily
    train: torch.Tensor
    sets: dict[str, torch.Tensor]
    full_model_dir: Path
    feature_dir: Callable[[str, str, str], Path]
    paths: RunPaths | None = None
    placement: Placement = field(
        default_factory=lambda: Placement(torch.device("cpu"), torch.float32))
    trajectories: dict[str, torch.Tensor] = field(default_factory=dict)
    sampler_timesteps: list[int] | None = None  # of the generated set, in sampling order
    progress: bool = True
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # pixels per set and "train"
    _features: dict = field(default_factory=dict, repr=False)
    _solvers: dict = field(default_factory=dict, repr=False)

    @cached_property
    def sched(self) -> ScheduleConstants:
        return ScheduleConstants.from_scheduler(self.family.scheduler(self.cfg.model))

    @cached_property
    def full_adapter(self) -> DiffusionAdapter:
        return self._load(self.full_model_dir)

    def _load(self, directory: Path) -> DiffusionAdapter:
        return self.family.bind(self.placement.put(self.family.load(directory)),
                                self.cfg.model.prediction_type, self.sched)

    def model_dir(self, model_id: str) -> Path:
        """The model directory a model id names."""
        if model_id == "full":
            return Path(self.full_model_dir)
        if m := _CKPT_ID.match(model_id):
            return (Path(self.full_model_dir).parent / "checkpoints"
                    / f"step-{int(m.group(1)):07d}" / "unet")
        if (m := _POOL_ID.match(model_id)) and self.paths is not None:
            return self.paths.pool_model(int(m.group(1)), self.cfg.lds.seeds[0]) / "unet"
        raise ValueError(f"unknown model id {model_id!r} (full, ckpt-<step>, pool-m<MMM> with a "
                         "run directory)")

    def adapter(self, model_id: str = "full") -> DiffusionAdapter:
        """The model ``model_id`` on the run's device (the full model is kept loaded)."""
        return self.full_adapter if model_id == "full" else self._load(self.model_dir(model_id))

    def spec(self, output: str, **changes) -> FeatureSpec:
        a = self.cfg.attribution
        spec = FeatureSpec(output=output, schedule=a.timesteps, n_timesteps=a.n_timesteps,
                           projector=a.projector, proj_dim=a.proj_dim, proj_seed=a.proj_seed,
                           noise_seed=a.noise_seed)
        return replace(spec, **changes)

    def examples(self, set_name: str) -> torch.Tensor:
        if set_name == "train":
            return self.train
        if set_name not in self.sets:
            raise ValueError(f"unknown target set {set_name!r}; have {', '.join(self.sets)}")
        return self.sets[set_name]

    def pixels(self, set_name: str) -> torch.Tensor:
        """The images ``[n, C, H, W]`` in [-1, 1] of a set (``train`` included), whatever the
        family's examples are (plain images, labelled, captioned or encoded latents)."""
        if set_name in self.images:
            return self.images[set_name]
        examples = self.examples(set_name)
        if isinstance(examples, torch.Tensor):
            return examples
        if isinstance(getattr(examples, "images", None), torch.Tensor):
            return examples.images
        raise ValueError(f"the {set_name} examples ({type(examples).__name__}) hold no pixels: "
                         "give the Context the images (Context(..., images={set: images}))")

    def at_timesteps(self, n_timesteps: int) -> Context:
        """This context with ``attribution.n_timesteps = K`` (features and solvers shared:
        they are keyed by the feature spec, which names K)."""
        if n_timesteps == self.cfg.attribution.n_timesteps:
            return self
        cfg = replace(self.cfg, attribution=replace(self.cfg.attribution,
                                                    n_timesteps=n_timesteps))
        other = replace(self, cfg=cfg)
        other._features, other._solvers = self._features, self._solvers
        for name in ("sched", "full_adapter"):  # reuse the loaded model and schedule
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other

    def features(self, set_name: str, output: str, model_id: str = "full",
                 spec: FeatureSpec | None = None, examples=None,
                 timestep_values: torch.Tensor | None = None) -> np.ndarray:
        """Features ``[n, k]`` of a set for one output function (computed if missing).

        ``examples``/``timestep_values`` replace the set's examples and the spec's timesteps
        for specs that say so (``spec.journey``: one clean image per timestep).
        """
        spec = spec or self.spec(output)
        key = (model_id, set_name, spec)
        if key not in self._features:
            store = featurize_into(
                self.adapter(model_id),
                self.examples(set_name) if examples is None else examples,
                self.feature_dir(model_id, set_name, spec.name), spec, self.sched,
                model_id, set_name, batch_size=self.cfg.attribution.batch_size,
                timestep_values=timestep_values, progress=self.progress,
                gradients=self.cfg.attribution.gradients,
                shard_rows=self.cfg.attribution.store_shard_rows)
            self._features[key] = store.load()
        return self._features[key]

    def prefetch(self, set_name: str, outputs: list[str] | tuple[str, ...],
                 model_id: str = "full") -> dict[str, np.ndarray]:
        """Features of several output functions of one set, computed together.

        Missing stores are filled by :func:`~dtrak.featurize.featurize_many` (one forward
        pass per batch for all of them); the result equals calling :meth:`features` per
        output.
        """
        outputs = list(dict.fromkeys(outputs))
        todo = {o: self.feature_dir(model_id, set_name, self.spec(o).name) for o in outputs
                if (model_id, set_name, self.spec(o)) not in self._features}
        if todo:  # one pass for all outputs, also for one: the same rounding as shards
            featurize_many(self.adapter(model_id), self.examples(set_name), todo,
                           self.spec(outputs[0]), self.sched, model_id, set_name,
                           batch_size=self.cfg.attribution.batch_size, progress=self.progress,
                           gradients=self.cfg.attribution.gradients,
                           shard_rows=self.cfg.attribution.store_shard_rows)
        return {o: self.features(set_name, o, model_id=model_id) for o in outputs}

    def memo(self, key: tuple, compute: Callable[[], object]) -> object:
        """``compute()`` once per key (a method's own tables, e.g. DAS's residual weights,
        which it keeps resumable in the run directory itself)."""
        if key not in self._features:
            self._features[key] = compute()
        return self._features[key]

    def solver(self, output: str, model_id: str = "full", spec: FeatureSpec | None = None
               ) -> scoring.KernelSolver:
        """The kernel of ``model_id``'s training features (computed first if missing);
        ``spec`` replaces the default spec of ``output`` (e.g. unit-normalised features)."""
        spec = spec or self.spec(output)
        key = (model_id, spec)
        if key not in self._solvers:
            self._solvers[key] = scoring.KernelSolver(
                self.features("train", output, model_id=model_id, spec=spec),
                device=None if self.placement.device.type == "cpu" else self.placement.device)
        return self._solvers[key]


def lambda_scale(ctx: Context, method: Method) -> float:
    """The scale a method's lambda is relative to: its own ``lambda_scale``, else
    ``trace(Phi^T Phi)/N`` of its kernel."""
    mctx = method.context(ctx)
    if method.lambda_scale is not None:
        return float(method.lambda_scale(mctx))
    return mctx.solver(method.output, spec=method.spec(ctx)).trace_scale


def default_lambda(ctx: Context, method: Method) -> float | None:
    """The prior lambda of a method (absolute), or None for methods without one."""
    if not method.uses_lambda:
        return None
    rel = prior_lambda_rel(method.output) if method.lambda_prior is None else method.lambda_prior
    return rel * lambda_scale(ctx, method)


def method_lambda_grid(ctx: Context, method: Method) -> np.ndarray:
    """The lambdas a method's LDS selects from (``attribution.lambdas``: paper or relative;
    a method with its own ``lambda_scale`` always uses the relative grid)."""
    absolute = ctx.cfg.attribution.lambdas == "paper" and method.lambda_scale is None
    if absolute:
        return lambda_grid("absolute")
    return lambda_grid("relative", trace_scale=lambda_scale(ctx, method))
