"""Checks of a whole config against the registries, before any stage runs.

The config sections validate their own keys (:mod:`dtrak.config`); what needs the method and
output registries, or ties sections together, is checked here, so that a misspelt method or
an impossible count is reported at once, not after hours of training.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..farm import EXECUTORS
from ..methods import get_method
from ..outputs import get_output
from ..train import check_trainable

__all__ = ["check_config", "removal_count"]


def removal_count(remove: float, n_train: int) -> int:
    """k: ``remove`` as a count (>= 1, an integer) or a fraction (< 1) of ``n_train``.

    A fraction is rounded to the nearest count, at least 1. At least one training image
    must remain.
    """
    if remove <= 0:
        raise ValueError(f"counterfactual.remove must be > 0, got {remove}")
    if remove >= 1:
        if not float(remove).is_integer():
            raise ValueError(f"counterfactual.remove = {remove}: a count must be a whole number "
                             "(or give a fraction < 1 of the training set)")
        k = int(remove)
    else:
        k = max(1, round(remove * n_train))
    if k >= n_train:
        raise ValueError(f"counterfactual.remove = {remove:g} removes {k} of {n_train} training "
                         "images; at least one must remain (use a smaller count or a fraction)")
    return k


_TRAINING_STAGES = ("train", "lds", "counterfactual")


def _problems(cfg: Config) -> list[str]:
    out = []
    if any(s in cfg.stages for s in _TRAINING_STAGES):
        try:
            check_trainable(cfg.model)
        except ConfigError as e:
            out.append(str(e))
    for name in cfg.attribution.outputs:
        try:
            get_output(name)
        except ValueError as e:
            out.append(f"attribution.outputs: {e}")
    for key, names in (("attribution.methods", cfg.attribution.methods),
                       ("counterfactual.methods", cfg.counterfactual.methods)):
        for name in names:
            try:
                method = get_method(name)
            except ValueError as e:
                out.append(f"{key}: {e}")
                continue
            members = method.pool.members if method.pool is not None else None
            if members is not None and members > cfg.lds.n_subsets:
                out.append(f"{key}: {name} reads {members} pool models but lds.n_subsets = "
                           f"{cfg.lds.n_subsets} sets the pool size; raise it")
    if cfg.runtime.executor not in EXECUTORS:
        out.append(f"runtime.executor: unknown executor {cfg.runtime.executor!r}; known: "
                   f"{', '.join(EXECUTORS)}")
    if "counterfactual" in cfg.stages and cfg.data.train_size is not None:
        try:
            removal_count(cfg.counterfactual.remove, cfg.data.train_size)
        except ValueError as e:
            out.append(str(e))
    return out


def check_config(cfg: Config) -> Config:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` (or return it)."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("the config has problems:\n  " + "\n  ".join(problems))
    return cfg
