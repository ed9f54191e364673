"""The paper's baselines (SPEC section 4) as registered attribution methods.

Each method scores a target set into a ``[targets, N_train]`` float32 matrix, positive = the
training example helps the target (lowers its loss); the ``sign`` of each registry entry says
why. The numerical cores are :mod:`dtrak.scoring`'s; this module gathers what they read
(images, CLIP embeddings, loss-gradient features of the full model, of its checkpoints or along
a sampling trajectory, losses of retrained models) through a :class:`~dtrak.methods.Context`.

=====================  ==============================================================  ======
method                 score                                                           lambda
=====================  ==============================================================  ======
random                 iid N(0, 1), seeded by the target set's name (control)          no
pixel-dot, pixel-cos   dot / cosine of flattened images in [-1, 1]                     no
clip-dot, clip-cos     dot / cosine of CLIP image embeddings (attribution.clip_path)   no
grad-dot, grad-cos     dot / cosine of the full model's loss-gradient features         no
tracin-dot, -cos       grad-dot / grad-cos averaged over training checkpoints          no
relative-if            TRAK (loss) / ||(Phi^T Phi + lam I)^-1 phi(z)||                 yes
renorm-if              TRAK (loss) / ||phi(z)||                                        yes
journey-trak           TRAK (loss) kernel, target features along the DDIM trajectory   yes
=====================  ==============================================================  ======

Choices where the SPEC leaves room (documented, not silent):

- TracIn: the plain average over checkpoints (SPEC: 4 evenly spaced), not weighted by the
  learning rate as in the TracIn paper. Checkpoints: ``attribution.checkpoints`` (training
  steps), else 4 evenly spaced among the saved ones (``np.linspace`` over the sorted list, so
  the first and the last saved are included). Each checkpoint gets its own projection
  (``model_id = "ckpt-<step>"``), as TRAK does per model.
- Journey TRAK: K = ``attribution.n_timesteps`` sampling steps evenly spaced among the S
  steps of the saved trajectory (``np.linspace(0, S - 1, K).round()``, all S if K > S); at
  step i the predicted clean image x0_hat is re-noised to the sampler's timestep t_i (from
  ``RUN/gen/meta.json``, else recomputed from the sampling config) with the usual
  per-(example, timestep) noise; the scores use the ordinary training-feature kernel.
  Generated targets only.

Empirical influence, datamodels and ensembles read retrained models: :mod:`dtrak.methods.pool`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from .. import scoring
from ..clip import clip_embed
from ..seeding import seed_from
from .base import Context, Method

log = logging.getLogger(__name__)

_registered: list[Method] = []
_add = _registered.append

__all__ = [
    "METHODS",
    "journey_features",
    "journey_steps",
    "sampler_timesteps",
    "tracin_checkpoints",
]

_HELPS_IF_SIMILAR = (
    "similar = helps: a training image that looks like the target (larger dot product / "
    "cosine) is assumed to help it"
)
_GRADIENT_SIGN = (
    "positive = helps: a gradient step on z moves theta by -eta g(z) and changes the loss on "
    "x by -eta g(x).g(z), so a positive product of loss gradients lowers the loss on x"
)
_TRAK_SIGN = "as trak (positive: up-weighting z lowers the target's loss), divided by a "


def _as_rows(images: torch.Tensor) -> np.ndarray:
    """Images ``[n, ...]`` -> ``[n, prod(...)]`` float32 numpy."""
    return images.reshape(images.shape[0], -1).float().numpy()


# ----------------------------------------------------------------------------- random


def _random(ctx: Context, set_name: str, lam=None) -> np.ndarray:
    n_targets = ctx.examples(set_name).shape[0]
    seed = seed_from("random-scores", set_name)
    return scoring.random_scores(n_targets, ctx.train.shape[0], seed)


_add(Method("random", "iid N(0, 1) scores seeded by the target set's name (control)",
                "no meaning: a control whose LDS should be about 0", _random))


# ----------------------------------------------------------------------------- pixels, CLIP


def _similarity(targets: np.ndarray, train: np.ndarray, cosine: bool) -> np.ndarray:
    return (scoring.cosine_scores if cosine else scoring.dot_scores)(targets, train)


def _pixel(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        return _similarity(_as_rows(ctx.pixels(set_name)), _as_rows(ctx.pixels("train")),
                           cosine)

    return score


def _clip_path(ctx: Context, name: str) -> str:
    path = ctx.cfg.attribution.clip_path
    if not path:
        raise ValueError(
            f"method {name} needs `--set attribution.clip_path=DIR`, a local CLIP model "
            "directory (such as openai/clip-vit-base-patch32 saved with save_pretrained); "
            "dtrak never downloads models"
        )
    return path


def _clip(name: str, cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        path = _clip_path(ctx, name)
        return _similarity(clip_embed(ctx.pixels(set_name), path),
                           clip_embed(ctx.pixels("train"), path), cosine)

    return score


for _cos in (False, True):
    _kind = "cosine" if _cos else "dot product"
    _sfx = "cos" if _cos else "dot"
    _add(Method(f"pixel-{_sfx}", f"{_kind} of raw pixels (flattened, in [-1, 1])",
                    _HELPS_IF_SIMILAR, _pixel(_cos)))
    _add(Method(f"clip-{_sfx}", f"{_kind} of CLIP image embeddings "
                    "(model from attribution.clip_path)", _HELPS_IF_SIMILAR,
                    _clip(f"clip-{_sfx}", _cos)))


# ----------------------------------------------------------------------------- gradients


def _grad(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        return _similarity(ctx.features(set_name, "loss"), ctx.features("train", "loss"),
                           cosine)

    return score


_STEP_DIR = re.compile(r"step-(\d+)$")


def tracin_checkpoints(model_dir: str | Path, steps: tuple[int, ...] | None = None,
                       n: int = 4) -> list[tuple[int, Path]]:
    """The checkpoints TracIn averages: ``[(step, directory with unet/)]``, ascending.

    ``model_dir`` is the full model's ``RUN/model/unet``; checkpoints are in
    ``RUN/model/checkpoints/step-XXXXXXX``. ``steps`` names them; None takes ``n`` evenly
    spaced among those saved (``np.linspace`` over the sorted list: first and last included).
    """
    root = Path(model_dir).parent / "checkpoints"
    saved = {}
    for d in root.glob("step-*"):
        m = _STEP_DIR.match(d.name)
        if m and (d / "unet" / "config.json").is_file():
            saved[int(m.group(1))] = d
    have = sorted(saved)
    if steps is not None:
        missing = [s for s in steps if s not in saved]
        if missing:
            raise FileNotFoundError(
                f"TracIn: no saved checkpoint for step(s) {missing} in {root} (saved: "
                f"{have or 'none'}); set attribution.checkpoints to saved steps"
            )
        return [(s, saved[s]) for s in sorted(set(steps))]
    if not have:
        raise FileNotFoundError(
            f"TracIn needs saved training checkpoints in {root}, found none; train with "
            "train.checkpoint_every below the number of steps"
        )
    idx = np.unique(np.linspace(0, len(have) - 1, min(n, len(have))).round().astype(int))
    return [(have[i], saved[have[i]]) for i in idx]


def _tracin(cosine: bool):
    def score(ctx: Context, set_name: str, lam=None) -> np.ndarray:
        pairs = []
        for step, _ in tracin_checkpoints(ctx.model_dir("full"), ctx.cfg.attribution.checkpoints):
            mid = f"ckpt-{step}"
            pairs.append((ctx.features(set_name, "loss", model_id=mid),
                          ctx.features("train", "loss", model_id=mid)))
        return scoring.tracin_scores(pairs, cosine=cosine)

    return score


for _cos in (False, True):
    _kind = "cosine" if _cos else "dot product"
    _sfx = "cos" if _cos else "dot"
    _add(Method(f"grad-{_sfx}", f"{_kind} of loss-gradient features (no kernel)",
                    _GRADIENT_SIGN, _grad(_cos), outputs=("loss",)))
    _add(Method(f"tracin-{_sfx}", f"TracIn: {_kind} of loss-gradient features averaged "
                    "over training checkpoints (plain mean, no learning-rate weights)",
                    _GRADIENT_SIGN + ", averaged over checkpoints", _tracin(_cos)))
del _cos, _kind, _sfx


# ----------------------------------------------------------------------------- kernel variants


def _relative(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return scoring.relative_influence(ctx.solver("loss"), ctx.features(set_name, "loss"), lam)


def _renorm(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return scoring.renormalized_influence(ctx.solver("loss"), ctx.features(set_name, "loss"),
                                          lam, train_features=ctx.features("train", "loss"))


_add(Method("relative-if", "relative influence: TRAK (loss) score / "
                "||(Phi^T Phi + lam I)^-1 phi(z)||",
                _TRAK_SIGN + "positive per-example norm", _relative, uses_lambda=True,
                outputs=("loss",), output="loss"))
_add(Method("renorm-if", "renormalized influence: TRAK (loss) score / ||phi(z)||",
                _TRAK_SIGN + "positive per-example norm", _renorm, uses_lambda=True,
                outputs=("loss",), output="loss"))


# ----------------------------------------------------------------------------- Journey TRAK


def sampler_timesteps(ctx: Context) -> list[int]:
    """The sampler's timesteps ``[S]`` in sampling order (descending).

    Those the generation recorded (``ctx.sampler_timesteps``, from ``RUN/gen/meta.json``),
    else recomputed from the sampling config exactly as the sampling loop sets them.
    """
    if ctx.sampler_timesteps:
        return [int(t) for t in ctx.sampler_timesteps]
    sc = ctx.cfg.sampling
    sched = ctx.family.scheduler(ctx.cfg.model, sc.sampler)
    sched.set_timesteps(sc.steps)
    return [int(t) for t in sched.timesteps]


def journey_steps(n_steps: int, k: int) -> np.ndarray:
    """Indices of ``k`` sampling steps evenly spaced among ``n_steps`` (all if k >= n_steps)."""
    if n_steps < 1 or k < 1:
        raise ValueError(f"journey_steps needs n_steps, k >= 1, got {n_steps}, {k}")
    return np.unique(np.linspace(0, n_steps - 1, min(k, n_steps)).round().astype(int))


def journey_features(ctx: Context, set_name: str = "gen") -> np.ndarray:
    """Loss-gradient features ``[T, k]`` of generated targets along their trajectories."""
    if set_name != "gen":
        raise ValueError("journey-trak needs generated targets (the gen set), "
                         f"not {set_name!r}")
    traj = ctx.trajectories.get("gen")
    if traj is None:
        raise FileNotFoundError(
            "journey-trak needs the sampling trajectories (RUN/gen/trajectory.npy): generate "
            "with sampling.save_trajectory=true"
        )
    n_targets = ctx.examples("gen").shape[0]
    if traj.dim() != 5 or traj.shape[0] != n_targets:
        raise ValueError(f"trajectories must be [{n_targets}, S, C, H, W] (one per gen target), "
                         f"got {tuple(traj.shape)}")
    n_steps = traj.shape[1]
    ts_all = sampler_timesteps(ctx)
    if len(ts_all) != n_steps:
        raise ValueError(
            f"the trajectory has {n_steps} steps but the sampler has {len(ts_all)} timesteps; "
            "regenerate (dtrak generate) with the run's sampling config"
        )
    steps = journey_steps(n_steps, ctx.cfg.attribution.n_timesteps)
    x0 = traj[:, torch.as_tensor(steps)]  # [T, K, C, H, W]
    ts = torch.tensor([ts_all[i] for i in steps], dtype=torch.long)
    spec = ctx.spec("loss", journey=True, n_timesteps=len(steps))
    return ctx.features("gen", "loss", spec=spec, examples=x0, timestep_values=ts)


def _journey(ctx: Context, set_name: str, lam: float) -> np.ndarray:
    return ctx.solver("loss").scores(journey_features(ctx, set_name), lam)


_add(Method("journey-trak", "Journey TRAK: the TRAK (loss) kernel with target features "
                "averaged along the sampling trajectory (re-noised x0_hat at each step); "
                "generated targets only",
                "as trak: positive = up-weighting z lowers the loss along the target's "
                "trajectory", _journey, uses_lambda=True, outputs=("loss",), output="loss",
                sets=("gen",)))

METHODS: tuple[Method, ...] = tuple(_registered)
