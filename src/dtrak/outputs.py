"""Output functions f(eps_pred, eps, t, sched): the scalar whose gradient is the feature.

Each function maps the model's noise prediction ``eps_pred [..., C, H, W]``, the true noise
``eps`` (same shape), the timesteps ``t [...]`` and the schedule constants to one value per
leading index ``[...]``. Means are over the ``C*H*W`` output entries (SPEC section 4).

| name   | f                                                   | paper                 |
| loss   | mean (eps - eps_pred)^2                             | L_Simple (TRAK)       |
| elbo   | w_t mean (eps - eps_pred)^2, w_t = b_t/(2 a_t (1-abar_t)) | L_ELBO          |
| square | mean eps_pred^2                                     | L_Square (D-TRAK)     |
| avg    | mean eps_pred                                       | L_Avg                 |
| l1     | sum abs(eps_pred)                                   | L_1-norm              |
| l2     | sqrt(sum eps_pred^2)                                | L_2-norm              |
| linf   | max abs(eps_pred)                                   | L_inf-norm            |

Aliases: ``trak`` -> ``loss``, ``dtrak`` -> ``square``.

All functions are vmap-safe: tensor ops only, no ``.item()``, no data-dependent Python
control flow. Add your own with :func:`register_output`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dtrak.noise import ScheduleConstants

__all__ = [
    "ALIASES",
    "OUTPUTS",
    "OutputFunction",
    "get_output",
    "register_output",
]

OutputFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ScheduleConstants], torch.Tensor]

_EVENT_DIMS = (-3, -2, -1)  # C, H, W


@dataclass(frozen=True)
class OutputFunction:
    """A named output function ``fn(eps_pred, eps, t, sched) -> Tensor[...]``."""

    name: str
    fn: OutputFn
    description: str

    def __call__(
        self, eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sched: ScheduleConstants
    ) -> torch.Tensor:
        return self.fn(eps_pred, eps, t, sched)


OUTPUTS: dict[str, OutputFunction] = {}
ALIASES: dict[str, str] = {"trak": "loss", "dtrak": "square"}


def register_output(
    name: str, description: str, replace: bool = False
) -> Callable[[OutputFn], OutputFn]:
    """Decorator adding ``fn(eps_pred, eps, t, sched) -> Tensor[...]`` to :data:`OUTPUTS`.

    The function must reduce over the last three dims ``(C, H, W)`` and be vmap-safe.
    """

    def decorator(fn: OutputFn) -> OutputFn:
        if not replace and (name in OUTPUTS or name in ALIASES):
            raise ValueError(
                f"output function {name!r} is already registered; pick another name or pass "
                "replace=True"
            )
        OUTPUTS[name] = OutputFunction(name=name, fn=fn, description=description)
        return fn

    return decorator


def get_output(name: str) -> OutputFunction:
    """The output function called ``name`` (or an alias such as ``trak``/``dtrak``)."""
    key = ALIASES.get(name, name)
    if key not in OUTPUTS:
        known = sorted(OUTPUTS) + [f"{a} (= {b})" for a, b in sorted(ALIASES.items())]
        raise ValueError(f"unknown output function {name!r}; known: {', '.join(known)}")
    return OUTPUTS[key]


def elbo_weight(t: torch.Tensor, sched: ScheduleConstants) -> torch.Tensor:
    """``w_t = beta_t / (2 alpha_t (1 - abar_t))``, float64, shape of ``t``."""
    device = t.device
    beta = sched.betas.to(device)[t]
    alpha = sched.alphas.to(device)[t]
    abar = sched.alphas_cumprod.to(device)[t]
    return beta / (2.0 * alpha * (1.0 - abar))


@register_output("loss", "mean (eps - eps_pred)^2 over C,H,W: L_Simple, the TRAK output")
def _loss(eps_pred, eps, t, sched):
    return (eps - eps_pred).square().mean(dim=_EVENT_DIMS)


@register_output("elbo", "w_t * mean (eps - eps_pred)^2, w_t = beta_t / (2 alpha_t (1 - abar_t))")
def _elbo(eps_pred, eps, t, sched):
    w = elbo_weight(t, sched).to(eps_pred.dtype)
    return w * (eps - eps_pred).square().mean(dim=_EVENT_DIMS)


@register_output("square", "mean eps_pred^2 over C,H,W: L_Square, the D-TRAK output")
def _square(eps_pred, eps, t, sched):
    return eps_pred.square().mean(dim=_EVENT_DIMS)


@register_output("avg", "mean eps_pred over C,H,W: L_Avg")
def _avg(eps_pred, eps, t, sched):
    return eps_pred.mean(dim=_EVENT_DIMS)


@register_output("l1", "sum |eps_pred| over C,H,W: L_1-norm")
def _l1(eps_pred, eps, t, sched):
    return eps_pred.abs().sum(dim=_EVENT_DIMS)


@register_output(
    "l2",
    "sqrt(sum eps_pred^2) over C,H,W: L_2-norm (gradient infinite only if eps_pred == 0 exactly)",
)
def _l2(eps_pred, eps, t, sched):
    # The gradient eps_pred / ||eps_pred|| is undefined at eps_pred == 0; a trained (or random)
    # network never predicts an exactly-zero noise map, and check_finite would catch it.
    return eps_pred.square().sum(dim=_EVENT_DIMS).sqrt()


@register_output("linf", "max |eps_pred| over C,H,W: L_inf-norm")
def _linf(eps_pred, eps, t, sched):
    return eps_pred.abs().amax(dim=_EVENT_DIMS)
