"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025), as its code computes it.

DAS attributes the change in the model's noise prediction rather than in its loss. It
linearises the noise predictor and takes one Newton step per removed example:

    s(x, z) = phi(x)^T (Phi^T Phi + lam I)^-1 phi(z) * e_z          (``das``)

- Features ``phi``: the gradient of ``f = mean eps_theta(x_t, t)`` (the ``avg`` output, raw
  noise prediction) at each of the K timesteps, each scaled to unit L2 norm over the
  attributed parameters, averaged over the K timesteps, then projected
  (``FeatureSpec(unit=True)``, :func:`dtrak.gradients.per_sample_unit_gradients`).
- Residual weight ``e_z`` of a training example: ``r_z(t) = sqrt(L_Simple(z, t))`` at
  ``das.residual_timesteps`` evenly spaced timesteps (their code: all 1000, one noise draw
  each), scaled to unit L2 norm over the timesteps, then averaged (:func:`residual_weights`).
- Kernel: ``(Phi^T Phi + lam I)^-1`` on the unit features. Their code also divides the
  inverse by its mean absolute entry; a constant factor changes no ranking and no LDS, so it
  is left out.

Variants (all registered; each one's LDS is reported):

- ``das``: the score above, signed. **The default**, because the LDS sums per-example effects
  over a subset and compares the sum with the subset model's loss: a signed, additive score
  is what that sum models (their ``DAS1``).
- ``das-sq``: its square (their ``DAS1squ``; the paper's formula is a squared norm of the
  change in the predicted noise, so this is the closest to the paper's text, but it throws
  the direction away: every example is predicted to help).
- ``das-loo`` / ``das-loo-sq``: divided by ``1 - h_z``, the leave-one-out correction with
  the leverage ``h_z = phi(z)^T (Phi^T Phi + lam I)^-1 phi(z)`` of the *training* example
  (their ``DAS0``). Their script takes h from the diagonal of the query x train score
  matrix, which pairs target q with training example q and looks like a bug, and divides by
  ``(1 - h)^2``; here h is each training example's own leverage and the division is by
  ``1 - h`` as in the paper's formula.

Lambda is chosen like every kernel's: the relative grid times ``trace(Phi^T Phi)/N`` of the
unit features, with held-out selection in the LDS.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import scoring
from ..families import DiffusionAdapter
from ..gradients import output_values
from ..noise import ScheduleConstants, timesteps
from ..seeding import seed_from
from ..store import make_store
from .base import Context, Method

__all__ = ["METHODS", "das_method", "residual_weights", "residual_weights_of"]

_SIGN = "positive: up-weighting z lowers the target's output (helps)"
_OUTPUT = "avg"  # f = mean eps_theta: the raw noise prediction
_UNIT = (("unit", True),)


def residual_weights(adapter: DiffusionAdapter, examples, sched: ScheduleConstants,
                     n_timesteps: int, seed: int, directory, batch_size: int = 64,
                     progress: bool = True) -> np.ndarray:
    """The residual weights ``e_z`` ``[N]`` float64 of ``examples``.

    Per-timestep L_Simple ``[N, n_timesteps]`` is kept in a store at ``directory`` (rows
    written per batch: a killed run resumes); ``r = sqrt(L)``, each row scaled to unit L2
    norm, then averaged over the timesteps. Noise: one draw per (example, timestep) from
    ``seed`` (:func:`dtrak.noise.example_noise`), so the result does not depend on batches.
    """
    T = len(sched.alphas_cumprod)
    ts = timesteps("uniform", n_timesteps, T)
    noise_seed = seed_from(seed, "das-residual") % (2**62)
    meta = {"kind": "das-residual", "n_timesteps": n_timesteps, "seed": seed,
            "timesteps": [int(t) for t in ts]}
    store = make_store(directory, len(examples), n_timesteps, meta)
    todo = np.flatnonzero(store.missing_mask())
    adapter.module.eval()
    with tqdm(total=len(todo), desc="DAS residual weights", disable=not progress or not len(todo),
              leave=False) as bar:
        for lo in range(0, len(todo), batch_size):
            ids = todo[lo:lo + batch_size]
            x0, cond = adapter.prepare(examples[torch.as_tensor(ids)])
            with torch.no_grad():
                mse = output_values(adapter, x0, torch.as_tensor(ids), "loss", ts, sched,
                                    noise_seed, cond=cond)
            store.write(ids, mse.double().cpu().numpy())
            bar.update(len(ids))
    r = np.sqrt(np.clip(store.load().astype(np.float64), 0.0, None))
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    return (r / np.where(norms > 0, norms, 1.0)).mean(axis=1)


def residual_weights_of(ctx: Context) -> np.ndarray:
    """The run's residual weights of its training set (computed once, kept with the
    features in a folder named by their settings)."""
    c = ctx.cfg.das
    name = f"das-residual-uniform{c.residual_timesteps}-s{c.residual_seed}"
    return ctx.memo(("das-residual", name), lambda: residual_weights(
        ctx.adapter("full"), ctx.train, ctx.sched, c.residual_timesteps, c.residual_seed,
        ctx.feature_dir("full", "train", name), progress=ctx.progress))


def das_method(name: str, leave_one_out: bool, square: bool, description: str) -> Method:
    """One DAS variant (see the module)."""

    def score(ctx: Context, set_name: str, lam: float) -> np.ndarray:
        spec = ctx.spec(_OUTPUT, **dict(_UNIT))
        solver = ctx.solver(_OUTPUT, spec=spec)
        return scoring.das_scores(solver, ctx.features(set_name, _OUTPUT, spec=spec),
                                  residual_weights_of(ctx), lam, leave_one_out, square)

    return Method(name, description, _SIGN, score, uses_lambda=True, output=_OUTPUT,
                  feature=_UNIT, config=("das",))


METHODS = (
    das_method("das", False, False, "DAS: unit-normalised noise-prediction gradients through "
               "the kernel, times the residual weight (their DAS1; the default)"),
    das_method("das-sq", False, True, "DAS squared (their DAS1squ)"),
    das_method("das-loo", True, False, "DAS with the leave-one-out division by 1 - h_z "
               "(the training example's leverage; their DAS0, corrected)"),
    das_method("das-loo-sq", True, True, "DAS leave-one-out, squared"),
)
