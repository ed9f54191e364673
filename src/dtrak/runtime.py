"""Where computation runs: the device and dtype of a run, resolved once from its config.

``runtime.device = "auto"`` picks CUDA when torch sees a GPU and the CPU otherwise; an
explicit ``cuda`` on a machine without one is refused with a clear error rather than
silently run on the CPU. Random numbers never depend on the device: every seeded draw
(training noise, per-example feature noise, sampling noise) is made by a CPU
``torch.Generator`` and then moved, so features and scores agree across devices to float
tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, RuntimeConfig

__all__ = ["Placement", "placement", "resolve_device", "resolve_dtype", "set_threads"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device: {name!r} asked for, but torch sees no CUDA device here; use "
                "runtime.device=auto or cpu (or install a CUDA build of torch)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"runtime.device: {name!r} asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"runtime.dtype: unknown {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype: ``placement.put(model)`` moves a model there."""

    device: torch.device
    dtype: torch.dtype

    def put(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        first = next(module.parameters(), None)
        if first is not None and first.dtype != self.dtype:
            module = module.to(self.dtype)
        return module

    @property
    def name(self) -> str:
        return f"{self.device} / {str(self.dtype).removeprefix('torch.')}"


def placement(cfg: RuntimeConfig) -> Placement:
    return Placement(resolve_device(cfg.device), resolve_dtype(cfg.dtype))


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)
