"""TRAK-style kernel methods: ``trak`` (loss), ``dtrak`` (L_Square), ``kernel-<output>``, ``@K``.

``tau(x) = phi(x)^T (Phi^T Phi + lam I)^-1 Phi^T`` on the full model's features of one output
function (SPEC section 4); ``method@K`` is any method with its features taken at K timesteps.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..outputs import OUTPUTS
from .base import Context, Method

__all__ = ["METHODS", "at_timesteps", "build", "kernel_method"]

_SIGN = "positive: up-weighting z lowers the target's output (helps)"


def kernel_method(name: str, output: str, description: str | None = None) -> Method:
    """The kernel on ``output`` features, named ``name``."""

    def score(ctx: Context, set_name: str, lam: float) -> np.ndarray:
        return ctx.solver(output).scores(ctx.features(set_name, output), lam)

    return Method(name, description or f"TRAK-style kernel on {output} features", _SIGN,
                  score, uses_lambda=True, outputs=(output,), output=output, kernel=True)


def at_timesteps(base: Method, k: int) -> Method:
    """``base`` with its features taken at ``k`` timesteps (the ``method@K`` names)."""

    def score(ctx: Context, set_name: str, lam: float | None) -> np.ndarray:
        return base.score(ctx.at_timesteps(k), set_name, lam)

    return replace(base, name=f"{base.name}@{k}", description=f"{base.description} (K = {k})",
                   score=score, n_timesteps=k)


METHODS = (
    kernel_method("trak", "loss", "TRAK: kernel on loss-gradient features (L_Simple)"),
    kernel_method("dtrak", "square", "D-TRAK: kernel on L_Square-gradient features"),
)


def build(name: str) -> Method | None:
    """``kernel-<output>`` for any registered output function."""
    if name.startswith("kernel-") and name[7:] in OUTPUTS:
        return kernel_method(name, name[7:])
    return None


build.patterns = ("kernel-<output>",)
