"""Random projections ``P: R^p -> R^k`` of gradient features, seeded by (seed, model_id).

Every projector is a fixed linear map: ``project(g) = g @ M`` for a ``[p, k]`` matrix ``M``
that depends only on ``(kind, p, k, seed, model_id)`` (and the documented construction
parameters in :meth:`Projector.describe`), never on the batch size or the call order.
All are scaled so that ``E[<Pg, Ph>] = <g, h>``.

- :class:`DenseProjector` (``gaussian``, ``rademacher``): the reference, like trak's
  ``BasicProjector``: the dense matrix is regenerated block by block (rows of ``p``) from
  per-block seeds at every call. Cost ``O(p k)`` random draws and flops per call.
- :class:`SRHTProjector` (``srht``): subsampled randomized Hadamard transform
  ``sqrt(1/k) S H D``: random signs, a fast Walsh-Hadamard transform over ``p`` padded to a
  power of two, then ``k`` seeded rows. ``O(p log p)`` per example, independent of ``k``.
- :class:`SJLTProjector` (``sjlt``): sparse JL / count sketch with ``s`` nonzeros per input
  coordinate, one in each of ``s`` bucket ranges. ``O(p s)`` per example.
- :class:`IdentityProjector` (``none``): ``k = p``, the exact kernel ("k = infinity").
- ``trak-cuda``: trak's CUDA projector when the optional ``trak`` package and CUDA exist.
- :class:`KronProjector` (``kron``): a factored projection (as LoGra / FactGraSS): each
  Linear / Conv2d weight's gradient ``[d_out, d_in]`` is mapped to ``A_out G A_in^T``, i.e.
  ``(A_out (x) A_in) vec(G)``, which the hook engine forms from the projected layer inputs
  and output gradients without materialising ``G`` (:mod:`dtrak.hooks`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dtrak.seeding import seed_from

__all__ = [
    "PROJECTOR_KINDS",
    "DenseProjector",
    "IdentityProjector",
    "KronLayer",
    "KronProjector",
    "Projector",
    "SJLTProjector",
    "SRHTProjector",
    "TrakCudaProjector",
    "kron_dims",
    "make_projector",
]

log = logging.getLogger(__name__)

PROJECTOR_KINDS = ("gaussian", "rademacher", "srht", "sjlt", "none", "trak-cuda", "kron")


def _on(projector: Projector, device: torch.device, *names: str) -> list[torch.Tensor]:
    """The projector's seeded tensors ``names`` on ``device``, copied there once (at the
    paper's p = 35.7M an SJLT's bucket table is 285 MB: not a copy to repeat per batch)."""
    if device.type == "cpu":
        return [getattr(projector, n) for n in names]
    cache = projector.__dict__.setdefault("_device_copies", {})
    for n in names:
        if (n, device) not in cache:
            cache[(n, device)] = getattr(projector, n).to(device)
    return [cache[(n, device)] for n in names]


class Projector(ABC):
    """A fixed random linear map ``R^p -> R^k``.

    Attributes:
        p: input dimension (number of gradient entries).
        k: output dimension.
        kind: construction name (one of :data:`PROJECTOR_KINDS`).
        seed: projection seed.
        model_id: which model of an ensemble (a different projection per model).
    """

    kind: str = ""

    def __init__(self, p: int, k: int, seed: int, model_id: int) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"projection dimensions must be >= 1, got p={p}, k={k}")
        if seed < 0 or model_id < 0:
            raise ValueError(f"seed and model_id must be >= 0, got {seed}, {model_id}")
        self.p, self.k, self.seed, self.model_id = int(p), int(k), int(seed), int(model_id)

    @abstractmethod
    def _project(self, g: torch.Tensor) -> torch.Tensor:
        """``[B, p]`` float32 -> ``[B, k]`` float32."""

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Project gradients ``[B, p]`` (any float dtype) to features ``[B, k]`` float32."""
        if g.dim() != 2 or g.shape[1] != self.p:
            raise ValueError(
                f"{type(self).__name__} expects gradients [B, p={self.p}], got {tuple(g.shape)}; "
                "build the projector with the gradient dimension of this model"
            )
        return self._project(g.float())

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the projection (for store metadata)."""
        return {"kind": self.kind, "p": self.p, "k": self.k, "seed": self.seed,
                "model_id": self.model_id}

    def matrix(self, max_p: int = 1 << 14) -> torch.Tensor:
        """The projection as a dense ``[p, k]`` matrix (``project(g) == g @ matrix()``).

        Materialised by projecting the identity; for small ``p`` only (tests).
        """
        if self.p > max_p:
            raise ValueError(f"matrix() is for small p (<= {max_p}), this projector has p={self.p}")
        eye = torch.eye(self.p)
        return torch.cat([self.project(eye[i : i + 1024]) for i in range(0, self.p, 1024)])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class DenseProjector(Projector):
    """Reference dense projection, regenerated block by block at every call.

    Rows ``[b * block_size, (b + 1) * block_size)`` of the matrix come from a generator seeded
    with ``seed_from(seed, "dense", kind, model_id, b)``; entries are ``N(0, 1) / sqrt(k)``
    (``gaussian``) or ``+-1 / sqrt(k)`` (``rademacher``). ``block_size`` is part of the
    projection's identity (it fixes which rows share a seed).
    """

    def __init__(
        self, p: int, k: int, kind: str = "gaussian", seed: int = 0, model_id: int = 0,
        block_size: int = 1024,
    ) -> None:
        super().__init__(p, k, seed, model_id)
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"DenseProjector kind must be gaussian or rademacher, got {kind!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.kind, self.block_size = kind, int(block_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": self.block_size}

    def _block(self, b: int) -> torch.Tensor:
        """Rows of block ``b``: ``[rows, k]`` float32, already scaled by ``1/sqrt(k)``."""
        rows = min(self.block_size, self.p - b * self.block_size)
        seed = seed_from(self.seed, "dense", self.kind, self.model_id, b)
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "gaussian":
            block = torch.randn((rows, self.k), generator=gen)
        else:
            # rand < 0.5 in place: +-1 signs at the cost of one uniform draw (randint is 2x slower)
            block = torch.rand((rows, self.k), generator=gen).lt_(0.5).mul_(2).sub_(1)
        return block.mul_(1.0 / math.sqrt(self.k))

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((g.shape[0], self.k), dtype=torch.float32, device=g.device)
        for b in range(math.ceil(self.p / self.block_size)):
            lo = b * self.block_size
            block = self._block(b).to(g.device)
            out.addmm_(g[:, lo : lo + block.shape[0]], block)
        return out

    def matrix(self, max_p: int = 1 << 14) -> torch.Tensor:
        if self.p > max_p:
            raise ValueError(f"matrix() is for small p (<= {max_p}), this projector has p={self.p}")
        return torch.cat([self._block(b) for b in range(math.ceil(self.p / self.block_size))])


def _hadamard(m: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix ``[m, m]`` (``m`` a power of two), entries +-1."""
    h = torch.ones((1, 1))
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor, factor: int = 32) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of each row of ``x [B, n]``, n = 2^j.

    Written by hand: no maintained torch package provides it. Instead of ``log2 n`` radix-2
    butterfly passes (memory-bound), ``H_n`` is applied as the Kronecker product of small
    Sylvester factors ``H_f (x) H_f (x) ...`` (``f <= factor``), one batched matmul per
    factor along one axis of ``x`` viewed as ``[B, f, f, ..., f]``: about 4-8x faster on CPU.
    The result equals the Sylvester-ordered transform ``x @ H_n``.
    """
    B, n = x.shape
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    pre, rest = 1, n
    while rest > 1:
        f = min(factor, rest)
        rest //= f
        h = _hadamard(f).to(x)
        if rest == 1:  # the last axis: a plain matmul on the right
            x = x.reshape(B * pre, f) @ h
        else:  # a middle axis: batched H_f @ [f, rest] blocks
            x = torch.matmul(h, x.reshape(B * pre, f, rest))
        pre *= f
    return x.reshape(B, n)


class SRHTProjector(Projector):
    """Subsampled randomized Hadamard transform (FJLT), ``P g = (S H D g_pad) / sqrt(k)``.

    ``D``: random signs (seeded); ``g_pad``: ``g`` zero-padded to ``n = 2^ceil(log2 p)``;
    ``H``: unnormalised ``n x n`` Walsh-Hadamard (entries +-1); ``S``: ``k`` distinct rows
    drawn without replacement (seeded). Since ``H^T H = n I`` and each row is kept with
    probability ``k / n``, ``E[<Pg, Ph>] = <g, h>``. Requires ``k <= p``.
    """

    kind = "srht"

    def __init__(
        self, p: int, k: int, seed: int = 0, model_id: int = 0, batch_size: int = 4
    ) -> None:
        super().__init__(p, k, seed, model_id)
        if k > p:
            raise ValueError(
                f"srht needs k <= p, got k={k} > p={p}; use kind='none' (the exact kernel) "
                "when the gradient is this small"
            )
        self.n = 1 << (p - 1).bit_length()
        self.batch_size = int(batch_size)
        gen = torch.Generator().manual_seed(seed_from(seed, "srht", model_id))
        self.signs = torch.randint(0, 2, (p,), generator=gen).float().mul_(2).sub_(1)
        self.rows = torch.randperm(self.n, generator=gen)[:k].sort().values

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        signs, rows = _on(self, g.device, "signs", "rows")
        out = []
        for lo in range(0, g.shape[0], self.batch_size):  # bounds memory: [batch, n] floats
            chunk = g[lo : lo + self.batch_size]
            padded = torch.zeros((chunk.shape[0], self.n), dtype=torch.float32, device=g.device)
            padded[:, : self.p] = chunk * signs
            out.append(fwht(padded)[:, rows])
        return torch.cat(out).mul_(1.0 / math.sqrt(self.k))


class SJLTProjector(Projector):
    """Sparse JL transform (count sketch with ``s`` hashes): ``O(p s)`` per example.

    The output is split into ``s`` contiguous bucket ranges; input coordinate ``j`` adds
    ``sign_r(j) g_j / sqrt(s)`` to one seeded bucket in each range ``r``, so every column of
    the matrix has exactly ``s`` nonzeros in distinct rows and ``E[<Pg, Ph>] = <g, h>``.
    The inner-product variance is at most that of a dense Gaussian projection of the same
    ``k``. Requires ``s <= k``.
    """

    kind = "sjlt"

    def __init__(self, p: int, k: int, seed: int = 0, model_id: int = 0, s: int = 1) -> None:
        super().__init__(p, k, seed, model_id)
        if not 1 <= s <= k:
            raise ValueError(f"sjlt needs 1 <= s <= k, got s={s}, k={k}")
        self.s = int(s)
        gen = torch.Generator().manual_seed(seed_from(seed, "sjlt", model_id))
        edges = [r * k // s for r in range(s + 1)]
        self.buckets = torch.stack([
            torch.randint(edges[r], edges[r + 1], (p,), generator=gen) for r in range(s)
        ])
        self.signs = torch.randint(0, 2, (s, p), generator=gen).float().mul_(2).sub_(1)
        self.signs.mul_(1.0 / math.sqrt(s))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "s": self.s}

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        buckets, signs = _on(self, g.device, "buckets", "signs")
        out = torch.zeros((g.shape[0], self.k), dtype=torch.float32, device=g.device)
        for r in range(self.s):
            out.index_add_(1, buckets[r], g * signs[r])
        return out


class IdentityProjector(Projector):
    """No projection (``k = p``): features are the raw gradients, the exact kernel."""

    kind = "none"

    def __init__(self, p: int, k: int | None = None, seed: int = 0, model_id: int = 0) -> None:
        if k is not None and k != p:
            log.info("kind='none' keeps all p=%d gradient entries; ignoring k=%d", p, k)
        super().__init__(p, p, seed, model_id)

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        return g.clone()


class TrakCudaProjector(Projector):
    """trak's fused CUDA Rademacher projector (optional ``trak`` package, CUDA only).

    Scaled by ``1/sqrt(k)`` like the others. trak constrains ``k`` (a multiple of 512) and
    the batch size (a multiple of 8 up to ``max_batch_size``).
    """

    kind = "trak-cuda"

    def __init__(
        self, p: int, k: int, seed: int = 0, model_id: int = 0, max_batch_size: int = 32
    ) -> None:
        super().__init__(p, k, seed, model_id)
        try:
            from trak.projectors import CudaProjector, ProjectionType
        except ImportError as err:
            raise ValueError(
                "kind='trak-cuda' needs the optional 'trak' package with its CUDA extension "
                "(pip install traker[fast]); use kind='srht' or 'sjlt' instead"
            ) from err
        if not torch.cuda.is_available():
            raise ValueError("kind='trak-cuda' needs a CUDA device; use kind='srht' or 'sjlt'")
        self._proj = CudaProjector(
            grad_dim=p, proj_dim=k, seed=seed_from(seed, "trak-cuda") % (2**31),
            proj_type=ProjectionType.rademacher, device="cuda", max_batch_size=max_batch_size,
        )

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        out = self._proj.project(g.to("cuda"), model_id=self.model_id)
        return (out.float() / math.sqrt(self.k)).to(g.device)


@dataclass(frozen=True)
class KronLayer:
    """A weight whose per-example gradient is a sum of outer products (output grad x input).

    Attributes:
        weight: the weight's parameter name; its gradient is viewed as ``[d_out, d_in]``
            (a Conv2d's ``[C_out, C_in, kh, kw]`` as ``[C_out, C_in kh kw]``, the order of
            ``F.unfold``'s patches).
        bias: the name of the layer's bias when it is attributed too (one more input column,
            of ones), else None.
        d_out: output size (features / channels).
        d_in: input size without the bias column.
    """

    weight: str
    bias: str | None
    d_out: int
    d_in: int

    @property
    def d_in_aug(self) -> int:
        """Input size with the bias column."""
        return self.d_in + (self.bias is not None)

    @property
    def numel(self) -> int:
        """Gradient entries of the block (weight and bias)."""
        return self.d_out * self.d_in_aug


def kron_dims(proj_dim: int, layers: Sequence[KronLayer], p_rest: int
              ) -> tuple[list[tuple[int, int]], int]:
    """Per-layer ``(k_out, k_in)`` and the rest block's ``k_rest`` for a budget ``proj_dim``.

    The rule: each block (every layer, and the rest: gradients not of a factored weight) gets
    a share ``k_b = max(1, round(proj_dim * p_b / p))`` proportional to its gradient size
    ``p_b``; a layer's share is split as ``k_out ~ k_in ~ sqrt(k_b)`` (``k_out = min(d_out,
    ceil(sqrt(k_b)))``, then ``k_in = min(d_in + bias, max(1, round(k_b / k_out)))``, then
    ``k_out`` re-fitted to ``k_b / k_in``); the rest keeps ``min(p_rest, k_b)``. The true
    feature dimension, ``sum k_out k_in + k_rest``, is near ``proj_dim`` but not equal to it.
    """
    p = sum(layer.numel for layer in layers) + p_rest
    dims = []
    for layer in layers:
        target = max(1, round(proj_dim * layer.numel / p))
        k_out = min(layer.d_out, math.ceil(math.sqrt(target)))
        k_in = min(layer.d_in_aug, max(1, round(target / k_out)))
        k_out = min(layer.d_out, max(1, round(target / k_in)))
        dims.append((k_out, k_in))
    k_rest = min(p_rest, max(1, round(proj_dim * p_rest / p))) if p_rest else 0
    return dims, k_rest


class KronProjector(Projector):
    """Factored (Kronecker) projection of per-layer gradients, as LoGra and FactGraSS.

    For every :class:`KronLayer` ``l`` with per-example gradient ``G_l [d_out, d_in (+1)]``
    (the bias as a last column), the features hold ``A_out G_l A_in^T`` flattened row-major
    (``[k_out, k_in]``), with seeded random ``A_out [k_out, d_out]``, ``A_in [k_in, d_in+1]``
    (entries ``N(0,1)/sqrt(rows)`` or ``+-1/sqrt(rows)``, drawn from
    ``seed_from(seed, "kron", entries, model_id, weight name)``); every other gradient entry
    (norm layers, embeddings, parameters of no factored layer) forms the rest block, projected
    with a :class:`DenseProjector`. Features: the layer blocks in ``layers`` order, then the
    rest. Since ``E[A^T A] = I`` for each independent factor, ``E[<Pg, Ph>] = <g, h>``.

    ``project(g)`` applies the map to materialised gradients ``[B, p]`` (the reference); the
    hook engine (:func:`dtrak.hooks.hook_gradients`) forms the same features from each
    layer's projected inputs ``A_in x`` and output gradients ``A_out dy`` without ever
    forming ``G_l``. ``k`` is the true dimension (:func:`kron_dims`), ``proj_dim`` the budget.

    Args:
        order: the flat gradient layout ``[(name, numel), ...]``
            (:func:`dtrak.gradients.param_order`); ``p`` is its total.
        layers: the factored weights (:func:`dtrak.hooks.kron_layers`).
        entries: ``gaussian`` or ``rademacher``.
    """

    kind = "kron"

    def __init__(self, p: int, k: int, seed: int = 0, model_id: int = 0,
                 order: Sequence[tuple[str, int]] | None = None,
                 layers: Sequence[KronLayer] | None = None, entries: str = "gaussian") -> None:
        if order is None or layers is None:
            raise ValueError(
                "projector 'kron' needs the model's layer layout (order= and layers=); it is "
                "built by featurization with attribution.gradients = 'hooks'")
        if entries not in ("gaussian", "rademacher"):
            raise ValueError(f"kron entries must be gaussian or rademacher, got {entries!r}")
        if sum(n for _, n in order) != p:
            raise ValueError(f"kron: the layout has {sum(n for _, n in order)} gradient "
                             f"entries but p={p}")
        super().__init__(p, k, seed, model_id)
        self.proj_dim, self.entries = int(k), entries
        self.order, self.layers = list(order), list(layers)
        offsets, at = {}, 0
        for name, numel in self.order:
            offsets[name] = (at, numel)
            at += numel
        self._offsets = offsets
        in_layers = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        unknown = sorted(in_layers - set(offsets))
        if unknown:
            raise ValueError(f"kron layers name parameters outside the layout: {unknown[:5]}")
        self.rest_names = [n for n, _ in self.order if n not in in_layers]
        p_rest = sum(offsets[n][1] for n in self.rest_names)
        self.dims, k_rest = kron_dims(self.proj_dim, self.layers, p_rest)
        self.factors = [self._factors(layer, ko, ki) for layer, (ko, ki) in
                        zip(self.layers, self.dims, strict=True)]
        self.rest = (DenseProjector(p_rest, k_rest, kind=entries, model_id=model_id,
                                    seed=seed_from(seed, "kron-rest") % (2**62))
                     if p_rest else None)
        self.k = sum(ko * ki for ko, ki in self.dims) + k_rest

    def _factors(self, layer: KronLayer, k_out: int, k_in: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_out [k_out, d_out], A_in [k_in, d_in + bias])`` float32, scaled."""
        gen = torch.Generator().manual_seed(
            seed_from(self.seed, "kron", self.entries, self.model_id, layer.weight))
        mats = []
        for rows, cols in ((k_out, layer.d_out), (k_in, layer.d_in_aug)):
            if self.entries == "gaussian":
                a = torch.randn((rows, cols), generator=gen)
            else:
                a = torch.rand((rows, cols), generator=gen).lt_(0.5).mul_(2).sub_(1)
            mats.append(a.mul_(1.0 / math.sqrt(rows)))
        return mats[0], mats[1]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "proj_dim": self.proj_dim, "entries": self.entries,
                "dims": [list(d) for d in self.dims],
                "k_rest": self.rest.k if self.rest is not None else 0}

    def columns(self, g: torch.Tensor, name: str) -> torch.Tensor:
        """The entries of parameter ``name`` in gradients ``[B, p]``: ``[B, numel]``."""
        lo, numel = self._offsets[name]
        return g[:, lo : lo + numel]

    def assemble(self, blocks: Sequence[torch.Tensor], rest: torch.Tensor | None
                 ) -> torch.Tensor:
        """Features ``[B, k]`` float32 from the projected layer blocks ``[B, k_out, k_in]``
        (``layers`` order) and the rest block's exact gradients ``[B, p_rest]``
        (``rest_names`` order, None when there is none)."""
        parts = [b.reshape(b.shape[0], -1).float() for b in blocks]
        if self.rest is not None:
            parts.append(self.rest.project(rest))
        return torch.cat(parts, dim=1)

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        blocks = []
        for layer, (a_out, a_in) in zip(self.layers, self.factors, strict=True):
            G = self.columns(g, layer.weight).reshape(-1, layer.d_out, layer.d_in)
            if layer.bias is not None:
                G = torch.cat([G, self.columns(g, layer.bias).unsqueeze(2)], dim=2)
            blocks.append(a_out.to(g.device) @ G @ a_in.to(g.device).T)
        rest = (torch.cat([self.columns(g, n) for n in self.rest_names], dim=1)
                if self.rest_names else None)
        return self.assemble(blocks, rest)


def make_projector(kind: str, p: int, k: int, seed: int = 0, model_id: int = 0,
                   **options: Any) -> Projector:
    """Build a projector by name (:data:`PROJECTOR_KINDS`); ``options`` go to its class."""
    if kind in ("gaussian", "rademacher"):
        return DenseProjector(p, k, kind=kind, seed=seed, model_id=model_id, **options)
    classes = {"srht": SRHTProjector, "sjlt": SJLTProjector, "none": IdentityProjector,
               "trak-cuda": TrakCudaProjector, "kron": KronProjector}
    if kind not in classes:
        known = ", ".join(PROJECTOR_KINDS)
        raise ValueError(f"unknown projector kind {kind!r}; use one of {known}")
    return classes[kind](p, k, seed=seed, model_id=model_id, **options)
