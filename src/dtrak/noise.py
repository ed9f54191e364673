"""Deterministic timesteps, noise and noise-schedule constants.

Randomness is data here: the Gaussian noise of example ``i`` at timestep index ``k`` is a
pure function of ``(seed, i, k)``, so features are identical whatever the batch size, shard
layout, order, or number of timesteps ``K`` (the noise of index ``k`` is the same for
``K = 10`` and ``K = 100``). Nothing in this module draws from a global generator.

The schedule constants are precomputed tensors, so code under ``torch.func`` transforms only
indexes tensors and never calls a stateful scheduler method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtrak.seeding import seed_from

__all__ = [
    "TIMESTEP_SCHEDULES",
    "ScheduleConstants",
    "add_noise",
    "alphas_cumprod_linear",
    "as_example_ids",
    "example_noise",
    "timesteps",
]

log = logging.getLogger(__name__)

TIMESTEP_SCHEDULES = ("uniform", "cumulative", "random")


def timesteps(schedule: str, K: int, T: int = 1000, seed: int = 0) -> torch.Tensor:
    """The ``K`` timesteps at which features are computed, ascending.

    - ``uniform``: ``range(0, T, T // K)[:K]`` (``K = 10`` -> 0, 100, ..., 900), the paper's.
    - ``cumulative``: ``range(0, K)``, the first ``K`` timesteps (an option of the D-TRAK code).
    - ``random``: ``K`` distinct timesteps drawn by a generator seeded with ``seed``, sorted.

    Returns:
        LongTensor ``[K]``.
    """
    if not 1 <= K <= T:
        raise ValueError(f"K (number of timesteps) must be in [1, T={T}], got {K}")
    if schedule == "uniform":
        return torch.arange(0, T, T // K, dtype=torch.long)[:K]
    if schedule == "cumulative":
        return torch.arange(K, dtype=torch.long)
    if schedule == "random":
        gen = torch.Generator().manual_seed(seed_from(seed, "timesteps", T))
        return torch.randperm(T, generator=gen)[:K].sort().values
    raise ValueError(
        f"unknown timestep schedule {schedule!r}; use one of {', '.join(TIMESTEP_SCHEDULES)}"
    )


def as_example_ids(example_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Example ids as a list of non-negative Python ints (validated)."""
    if isinstance(example_ids, torch.Tensor):
        if example_ids.dim() != 1 or example_ids.is_floating_point():
            raise ValueError(
                f"example_ids must be a 1-d integer tensor, got shape {tuple(example_ids.shape)} "
                f"and dtype {example_ids.dtype}"
            )
        ids = [int(i) for i in example_ids.tolist()]
    else:
        ids = [int(i) for i in example_ids]
    if any(i < 0 for i in ids):
        raise ValueError(f"example ids must be >= 0, got {min(ids)}")
    return ids


def example_noise(
    seed: int,
    example_ids: Sequence[int] | torch.Tensor,
    K: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gaussian noise, one draw per (example, timestep index).

    The draw for ``(seed, example_id, k)`` comes from its own generator seeded with
    ``seed_from(seed, "noise", example_id, k)``: it does not depend on the batch, its order, or
    ``K``. Values are drawn in float32 and then cast to ``dtype``, so a float64 run sees the
    same noise as a float32 run.

    Args:
        seed: noise seed.
        example_ids: ``B`` non-negative ids (dataset indices).
        K: number of timestep indices (``k = 0 .. K-1``).
        shape: shape of one noise draw, e.g. ``(C, H, W)``.

    Returns:
        Tensor ``[B, K, *shape]`` (CPU).
    """
    ids = as_example_ids(example_ids)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(ids), K, *shape), dtype=torch.float32)
    gen = torch.Generator()
    for b, example_id in enumerate(ids):
        for k in range(K):
            gen.manual_seed(seed_from(seed, "noise", example_id, k))
            torch.randn(shape, generator=gen, out=out[b, k])
    return out.to(dtype)


def alphas_cumprod_linear(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for linear betas, in float64.

    Matches ``DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").alphas_cumprod``
    (which diffusers computes in float32) to float32 precision.

    Returns:
        Tensor ``[T]`` float64.
    """
    return ScheduleConstants.linear(T, beta_start, beta_end).alphas_cumprod


@dataclass(frozen=True)
class ScheduleConstants:
    """Precomputed noise-schedule tensors, all ``[T]`` float64 on the CPU.

    Index them with a LongTensor of timesteps (also under ``vmap``); cast the result to the
    working dtype.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.betas, self.alphas, self.alphas_cumprod)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"betas, alphas, alphas_cumprod must all be [T], got {shapes}")

    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> ScheduleConstants:
        """Constants from betas ``[T]`` (computed in float64)."""
        betas = betas.detach().to("cpu", torch.float64)
        alphas = 1.0 - betas
        return cls(betas=betas, alphas=alphas, alphas_cumprod=torch.cumprod(alphas, dim=0))

    @classmethod
    def linear(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> ScheduleConstants:
        """The linear schedule (the paper's DDPM), computed in float64."""
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        return cls.from_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def from_scheduler(cls, scheduler) -> ScheduleConstants:
        """Constants read from a diffusers scheduler's ``betas`` and ``alphas_cumprod``.

        The scheduler's own (float32) values are kept, upcast to float64, so features match
        what the model saw in training exactly.
        """
        for attr in ("betas", "alphas_cumprod"):
            if not isinstance(getattr(scheduler, attr, None), torch.Tensor):
                raise ValueError(
                    f"scheduler {type(scheduler).__name__} has no tensor attribute {attr!r}; "
                    "pass a diffusers DDPMScheduler/DDIMScheduler or use ScheduleConstants.linear"
                )
        betas = scheduler.betas.detach().to("cpu", torch.float64)
        abar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        return cls(betas=betas, alphas=1.0 - betas, alphas_cumprod=abar)


def add_noise(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, pure (safe under vmap).

    Args:
        x0: clean samples ``[*lead, *event]``, e.g. ``[K, C, H, W]`` with ``t`` of shape ``[K]``.
        eps: noise, same shape as ``x0``.
        t: LongTensor ``[*lead]``; its dims are the leading dims of ``x0``.
        alphas_cumprod: ``[T]`` (any float dtype; cast to ``x0``'s).

    Returns:
        Tensor, shape of ``x0``.
    """
    abar = alphas_cumprod.to(device=x0.device)[t].to(x0.dtype)
    abar = abar.reshape(*abar.shape, *([1] * (x0.dim() - abar.dim())))
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
