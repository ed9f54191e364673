"""Attribution methods over a run: which features each needs and how it scores targets.

A method turns a target set (``val``, ``gen`` or any registered set) into a score matrix
``[targets, N_train]``; positive means the training example helps the target (lowers its
loss). Methods with a ridge term take ``lam`` (absolute); :func:`default_lambda` gives the
value used when no LDS has chosen one. The numerical cores live in :mod:`dtrak.scoring`;
this module connects them to a run's features, images and models through a
:class:`Context`, which computes missing features on demand (resumably, via the store).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from . import scoring
from .featurize import FeatureSpec, featurize_into, featurize_many
from .gradients import UNet2DAdapter
from .model import build_scheduler, load_unet
from .noise import ScheduleConstants
from .outputs import OUTPUTS

log = logging.getLogger(__name__)

__all__ = ["Context", "Method", "METHODS", "default_lambda", "get_method", "register"]


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

    def applies_to(self, set_name: str) -> bool:
        return self.sets is None or set_name in self.sets

    def context(self, ctx: Context) -> Context:
        """The context this method reads its features from (its own K, if it has one)."""
        return ctx if self.n_timesteps is None else ctx.at_timesteps(self.n_timesteps)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method, ``kernel-<output>``, or either with ``@K`` (K timesteps)."""
    if name in METHODS:
        return METHODS[name]
    if "@" in name:
        base_name, _, k = name.partition("@")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"method {name!r}: after '@' give the number of timesteps K >= 1, "
                             f"e.g. {base_name}@100")
        return register(_at_timesteps(get_method(base_name), int(k)))
    if name.startswith("kernel-") and name[7:] in OUTPUTS:
        return register(_kernel(name, name[7:], f"TRAK-style kernel on {name[7:]} features"))
    known = ", ".join(list(METHODS) + [f"kernel-{o}" for o in OUTPUTS])
    raise ValueError(f"unknown attribution method {name!r}; known: {known}")


@dataclass
class Context:
    """What methods read: a run's config, data, models and (lazily computed) features.

    ``sets`` maps a target-set name to its images ``[T, C, H, W]``; ``train`` is the
    training set ``[N, C, H, W]``. Features are computed into ``feature_dir(...)`` stores.
    """

    cfg: object  # dtrak.config.Config
    train: torch.Tensor
    sets: dict[str, torch.Tensor]
    model_dir: object  # Path of the full model's diffusers directory
    feature_dir: Callable[[str, str, str], object]  # (model_id, set, feature name) -> Path
    progress: bool = True
    trajectories: dict[str, torch.Tensor] = field(default_factory=dict)
    run_dir: object = None  # Path of the run (methods that retrain models need it), or None
    _features: dict = field(default_factory=dict, repr=False)
    _solvers: dict = field(default_factory=dict, repr=False)

    @cached_property
    def sched(self) -> ScheduleConstants:
        return ScheduleConstants.from_scheduler(build_scheduler(self.cfg.model))

    @cached_property
    def adapter(self) -> UNet2DAdapter:
        return UNet2DAdapter(load_unet(self.model_dir))

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

    def at_timesteps(self, n_timesteps: int) -> Context:
        """This context with ``attribution.n_timesteps = K`` (features and solvers shared:
        they are keyed by the feature spec, which names K)."""
        if n_timesteps == self.cfg.attribution.n_timesteps:
            return self
        cfg = replace(self.cfg, attribution=replace(self.cfg.attribution,
                                                    n_timesteps=n_timesteps))
        other = replace(self, cfg=cfg)
        other._features, other._solvers = self._features, self._solvers
        for name in ("sched", "adapter"):  # reuse the loaded model and schedule
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other

    def features(self, set_name: str, output: str, adapter=None, model_id: str = "full",
                 spec: FeatureSpec | None = None, examples: torch.Tensor | None = None,
                 timestep_values: torch.Tensor | None = None) -> np.ndarray:
        """Features ``[n, k]`` of a set for one output function (computed if missing)."""
        spec = spec or self.spec(output)
        key = (model_id, set_name, spec.name)
        if key not in self._features:
            store = featurize_into(
                adapter or self.adapter,
                self.examples(set_name) if examples is None else examples,
                self.feature_dir(model_id, set_name, spec.name), spec, self.sched,
                model_id, set_name, batch_size=self.cfg.attribution.batch_size,
                timestep_values=timestep_values, progress=self.progress)
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
                if (model_id, set_name, self.spec(o).name) not in self._features}
        if len(todo) > 1:
            featurize_many(self.adapter, self.examples(set_name), todo, self.spec(outputs[0]),
                           self.sched, model_id, set_name,
                           batch_size=self.cfg.attribution.batch_size, progress=self.progress)
        return {o: self.features(set_name, o, model_id=model_id) for o in outputs}

    def solver(self, output: str, model_id: str = "full") -> scoring.KernelSolver:
        """The kernel of ``model_id``'s training features (computed first for other models)."""
        key = (model_id, self.spec(output).name)
        if key not in self._solvers:
            self._solvers[key] = scoring.KernelSolver(
                self.features("train", output, model_id=model_id))
        return self._solvers[key]


# Prior ridge values relative to the kernel's scale trace(Phi^T Phi)/N, used only when no
# LDS has selected lambda: SPEC section 7 found about 0.1 for the loss and 1e-3..1e-4 for
# the D-TRAK output functions.
_LAMBDA_PRIOR = {"loss": 1e-1, "elbo": 1e-1}
_LAMBDA_PRIOR_DEFAULT = 1e-3


def prior_lambda_rel(output: str) -> float:
    """The ridge prior of an output function, relative to trace(Phi^T Phi)/N."""
    return _LAMBDA_PRIOR.get(output, _LAMBDA_PRIOR_DEFAULT)


def default_lambda(ctx: Context, method: Method) -> float | None:
    if not method.uses_lambda:
        return None
    ctx = method.context(ctx)
    return prior_lambda_rel(method.output) * ctx.solver(method.output).trace_scale


def lambda_grid(ctx: Context, method: Method) -> np.ndarray:
    ctx = method.context(ctx)
    solver = ctx.solver(method.output)
    scale = ctx.cfg.attribution.lambdas
    return scoring.lambda_grid("absolute" if scale == "paper" else "relative",
                               trace_scale=solver.trace_scale)


def _kernel(name: str, output: str, description: str) -> Method:
    def score(ctx: Context, set_name: str, lam: float) -> np.ndarray:
        return ctx.solver(output).scores(ctx.features(set_name, output), lam)

    return Method(name, description,
                  "positive: up-weighting z lowers the target's output (helps)",
                  score, uses_lambda=True, outputs=(output,), output=output, kernel=True)


def _at_timesteps(base: Method, k: int) -> Method:
    """``base`` with its features taken at ``k`` timesteps (the ``method@K`` names)."""

    def score(ctx: Context, set_name: str, lam: float | None) -> np.ndarray:
        return base.score(ctx.at_timesteps(k), set_name, lam)

    return replace(base, name=f"{base.name}@{k}", description=f"{base.description} (K = {k})",
                   score=score, n_timesteps=k)


register(_kernel("trak", "loss", "TRAK: kernel on loss-gradient features (L_Simple)"))
register(_kernel("dtrak", "square", "D-TRAK: kernel on L_Square-gradient features"))

from . import baselines  # noqa: E402,F401  (registers the baselines)
