"""Attribution methods: one registry, filled by one line per module below.

A method reads features and saved tables through a :class:`~dtrak.methods.base.Context` and
returns a ``[targets, N_train]`` score matrix (positive = helps). To add one: write a module
with a ``METHODS`` tuple of :class:`~dtrak.methods.base.Method` and add it to the
registration line. ``kernel-<output>`` and ``<method>@K`` are built on demand.
"""

from __future__ import annotations

from ..outputs import OUTPUTS
from . import baselines, kernel, pool
from .base import Context, Method, PoolNeed, default_lambda, method_lambda_grid

__all__ = [
    "METHODS",
    "Context",
    "Method",
    "PoolNeed",
    "default_lambda",
    "get_method",
    "method_lambda_grid",
    "register",
]

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
        return register(kernel.at_timesteps(get_method(base_name), int(k)))
    if name.startswith("kernel-") and name[7:] in OUTPUTS:
        return register(kernel.kernel_method(name, name[7:]))
    known = ", ".join(list(METHODS) + [f"kernel-{o}" for o in OUTPUTS])
    raise ValueError(f"unknown attribution method {name!r}; known: {known}")


for _method in (*kernel.METHODS, *baselines.METHODS, *pool.METHODS):
    register(_method)
