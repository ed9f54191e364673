"""Attribution methods: one registry, filled by one line per module below.

A method reads features and saved tables through a :class:`~dtrak.methods.base.Context` and
returns a ``[targets, N_train]`` score matrix (positive = helps). To add one: write a module
with a ``METHODS`` tuple of :class:`~dtrak.methods.base.Method` and add it to the
registration line (a module may also offer a ``build(name)`` for families of names, such as
``kernel-<output>``; ``<method>@K`` works for every method).
"""

from __future__ import annotations

from . import baselines, das, influence, kernel, pool
from .base import Context, Method, PoolNeed, default_lambda, lambda_scale, method_lambda_grid

__all__ = [
    "METHODS",
    "Context",
    "Method",
    "PoolNeed",
    "default_lambda",
    "get_method",
    "lambda_scale",
    "method_lambda_grid",
    "register",
]

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method, one a builder makes from its name, or either with ``@K``."""
    if name in METHODS:
        return METHODS[name]
    if "@" in name:
        base_name, _, k = name.partition("@")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"method {name!r}: after '@' give the number of timesteps K >= 1, "
                             f"e.g. {base_name}@100")
        return register(kernel.at_timesteps(get_method(base_name), int(k)))
    for build in _BUILDERS:
        if (method := build(name)) is not None:
            return register(method)
    known = ", ".join([*METHODS, *(pattern for b in _BUILDERS for pattern in b.patterns)])
    raise ValueError(f"unknown attribution method {name!r}; known: {known}")


# the registration line: a module's METHODS, and its builder of names if it has one
for _method in (*kernel.METHODS, *baselines.METHODS, *pool.METHODS, *das.METHODS,
                *influence.METHODS):
    register(_method)
_BUILDERS = (kernel.build, pool.build)
