"""Per-sample gradients from ONE batched forward and backward, by layer hooks.

The reference engine (:mod:`dtrak.gradients`, ``attribution.gradients = "vmap"``) runs
``vmap(grad(.))`` over examples. Here (``"hooks"``) the model runs once over all ``B x K``
noisy inputs as an ordinary batch (rows ``n = k B + b``, timestep-major; the same noise,
timesteps, conditioning and output functions as the reference), and one backward of

    L = sum_b (1/K) sum_k f(eps_theta(x_t_bk, t_k), eps_bk, t_k)

gives every layer's output gradient, row ``n`` carrying the gradient of its own example's
mean ``f`` (the reference's ``1/K``). Each hooked layer forms its per-example gradient from
its input ``x`` and output gradient ``dy``, summed over the example's ``K`` rows and
positions ``s``:

| layer                | per-example gradient                                          |
| Linear               | weight ``sum_s dy_s x_s^T``, bias ``sum_s dy_s``              |
| Conv2d               | the same over input patches (torch's weight-gradient kernel, the examples as groups) |
| GroupNorm, LayerNorm | weight ``sum_s dy_s * xhat_s`` (``xhat``: the normalised input), bias ``sum_s dy_s`` |
|                      | (GroupNorm: torch's backward kernel with the rows as one sample, the forward's statistics) |
| Embedding            | the rows of the example's indices: ``sum_s dy_s``             |

The rows are timestep-major so that a convolution's input and output gradient regroup as
``[K, B C, H, W]`` (the examples as groups, the timesteps as the batch the kernel sums) by a
view, without a copy.

peft's LoRA layers are a frozen base layer plus ``lora_A``/``lora_B`` Linear (or Conv2d)
modules, so they are covered. A layer counts only if its class keeps the torch forward (a
subclass overriding ``forward`` is not hooked); a Conv2d needs zero padding (not "same"),
an Embedding no ``max_norm``/``scale_grad_by_freq``.

**Uncovered parameters.** A selected parameter that no hooked layer owns (a bare
``nn.Parameter`` used in some forward, a layer of another type) is taken from the reference
path: one :func:`~dtrak.gradients.per_sample_gradients_multi` call restricted to those
parameters (logged once per call; slower, never different).

**Assumptions**, true of the families here (the float64 oracle tests check them against the
reference): every hooked layer sees the batch on dim 0 (checked: a layer seeing another
leading size raises); the forward mixes no rows of a batch (eval mode: no batch statistics);
and a covered parameter is read only by its own layer's forward (weights tied between two
hooked layers are fine, a weight also read functionally elsewhere would be missed).

**Mechanics.** A forward hook wraps each hooked layer's output in an identity autograd
function (:class:`_Tap`) whose backward receives ``dy`` and forms the layer's contribution;
it also ties the layer to a scalar anchor, and the backward asks for the gradient of the
anchor only, so autograd skips the batched weight gradients it would otherwise form and
every ``dy`` is consumed, then freed, as soon as it exists.

**Factored projection.** With a :class:`~dtrak.projection.KronProjector` the gradient of a
factored weight (Linear, ungrouped Conv2d) is never formed: its block of the features is
``sum_s (A_out dy_s)(A_in [x_s, 1])^T`` (a Conv2d projects its patches with ``A_in`` as a
convolution kernel), memory ``O(B k)``; the rest (norms, embeddings, uncovered parameters)
is formed exactly and projected densely.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRADIENT_ENGINES
from .families.base import Cond, DiffusionAdapter
from .gradients import (
    _inputs,
    _module_device_dtype,
    check_finite,
    eval_mode,
    full_float32,
    param_order,
    per_sample_gradients_multi,
    selected_parameters,
)
from .noise import ScheduleConstants, add_noise
from .outputs import get_output
from .projection import KronLayer, KronProjector

__all__ = [
    "GRADIENT_ENGINES",
    "HookedLayer",
    "hook_gradients",
    "hook_plan",
    "kron_layers",
]

log = logging.getLogger(__name__)

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"), (nn.Conv2d, "conv2d"), (nn.GroupNorm, "groupnorm"),
    (nn.LayerNorm, "layernorm"), (nn.Embedding, "embedding"),
)


# --- which layers carry which parameters -------------------------------------------------


@dataclass(frozen=True)
class HookedLayer:
    """A layer whose attributed parameters a hook covers.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        kind: linear, conv2d, groupnorm, layernorm or embedding.
        weight: the weight's parameter name when it is attributed, else None.
        bias: the bias's parameter name when it is attributed, else None.
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None


def _layer_kind(m: nn.Module) -> str | None:
    for cls, kind in _KINDS:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            if kind == "conv2d" and (m.padding_mode != "zeros" or m.padding == "same"):
                return None
            if kind == "embedding" and (m.max_norm is not None or m.scale_grad_by_freq):
                return None
            return kind
    return None


def hook_plan(module: nn.Module, order: list[tuple[str, int]]
              ) -> tuple[list[HookedLayer], list[str]]:
    """(the hooked layers owning parameters of ``order``, the parameters of ``order`` no
    hook covers, in ``order``)."""
    selected = {n for n, _ in order}
    names = {id(p): n for n, p in module.named_parameters()}
    layers, covered = [], set()
    for mname, m in module.named_modules():
        kind = _layer_kind(m)
        if kind is None:
            continue
        own = dict(m.named_parameters(recurse=False))
        w, b = (names.get(id(own[k])) if own.get(k) is not None else None
                for k in ("weight", "bias"))
        w, b = (w if w in selected else None), (b if b in selected else None)
        if w is None and b is None:
            continue
        layers.append(HookedLayer(mname, kind, w, b))
        covered.update(n for n in (w, b) if n)
    return layers, [n for n, _ in order if n not in covered]


def kron_layers(module: nn.Module, order: list[tuple[str, int]]) -> list[KronLayer]:
    """The factored weights of a :class:`~dtrak.projection.KronProjector`: every attributed
    Linear and ungrouped Conv2d weight (with its bias when that is attributed too), in
    ``order``; one entry per weight when layers share it."""
    layers, seen = [], set()
    modules = dict(module.named_modules())
    for h in hook_plan(module, order)[0]:
        m = modules[h.module]
        if h.weight is None or h.weight in seen or not (
                h.kind == "linear" or (h.kind == "conv2d" and m.groups == 1)):
            continue
        seen.add(h.weight)
        layers.append(KronLayer(h.weight, h.bias, m.weight.shape[0],
                                m.weight[0].numel()))
    position = {n: i for i, (n, _) in enumerate(order)}
    return sorted(layers, key=lambda layer: position[layer.weight])


# --- per-layer contributions ---------------------------------------------------------------


def _per_example(x: torch.Tensor, B: int) -> torch.Tensor:
    """Rows ``[K B, *rest, d]`` (timestep-major) as ``[B, K * prod(rest), d]`` per example."""
    d = x.shape[-1]
    return x.reshape(-1, B, *x.shape[1:]).transpose(0, 1).reshape(B, -1, d)


def _padding(m: nn.Conv2d) -> tuple[int, ...]:
    return (0, 0) if m.padding == "valid" else m.padding


def _linear(m: nn.Linear, h: HookedLayer, x: torch.Tensor, dy: torch.Tensor, B: int,
            state=None) -> dict[str, torch.Tensor]:
    K = x.shape[0] // B
    xs, gs = x.reshape(K, B, -1, x.shape[-1]), dy.reshape(K, B, -1, dy.shape[-1])  # [K, B, S, d]
    out = {}
    if h.weight:
        # one bmm per timestep, accumulated (regrouping the rows per example would copy x, dy)
        w = torch.bmm(gs[0].transpose(1, 2), xs[0])
        for k in range(1, xs.shape[0]):
            w.baddbmm_(gs[k].transpose(1, 2), xs[k])
        out[h.weight] = w
    if h.bias:
        out[h.bias] = gs.sum(2).sum(0)  # two passes: 5x faster than one over dims (0, 2)
    return out


def _conv2d(m: nn.Conv2d, h: HookedLayer, x: torch.Tensor, dy: torch.Tensor, B: int,
            state=None) -> dict[str, torch.Tensor]:
    K, Cout = x.shape[0] // B, dy.shape[1]
    # The examples as groups: x [K B, C, H, W] -> [K, B C, H, W] (a view; K the batch, summed
    # by the kernel), a convolution with B * groups groups whose weight gradient
    # [B Cout, Cin/groups, kh, kw] holds every example's own, and whose bias gradient [B Cout]
    # too: torch's weight-gradient kernel, called as torch.nn.grad.conv2d_weight does, with
    # the bias asked for in the same pass.
    xs, gs = x.reshape(K, -1, *x.shape[2:]), dy.reshape(K, -1, *dy.shape[2:])
    shape = (B * Cout, *m.weight.shape[1:])
    _, w, b = torch.ops.aten.convolution_backward(
        gs, xs, gs.new_empty(1).expand(shape), [B * Cout] if h.bias else None, m.stride,
        _padding(m), m.dilation, False, [0, 0], B * m.groups, [False, bool(h.weight),
                                                                 bool(h.bias)])
    out = {}
    if h.weight:
        out[h.weight] = w.reshape(B, *m.weight.shape)
    if h.bias:
        out[h.bias] = b.reshape(B, Cout)
    return out


def group_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, rstd) a GroupNorm's forward computed for ``out``, read from the autograd
    node that saved them for its own backward; None when ``out`` has no such node."""
    node = out.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


def _groupnorm(m: nn.GroupNorm, h, x, dy, B, state=None):
    # sum_s dy_s xhat_s and sum_s dy_s per (row, channel) in one pass, without forming xhat:
    # torch's own GroupNorm backward kernel, run as ONE sample of n C channels in n G groups,
    # so the "batch-summed" parameter gradients it returns are per row. The group statistics
    # are the forward's own (from its autograd node), else computed again.
    n, C, G = x.shape[0], x.shape[1], m.num_groups
    x, dy = x.reshape(1, n * C, -1), dy.reshape(1, n * C, -1)
    if state is None:
        _, mu, rstd = torch.native_group_norm(x, None, None, 1, n * C, x.shape[-1], n * G,
                                              m.eps)
    else:
        mu, rstd = state
    _, w, b = torch.ops.aten.native_group_norm_backward(
        dy.contiguous(), x.contiguous(), mu.reshape(1, n * G), rstd.reshape(1, n * G),
        x.new_ones(n * C), 1, n * C, x.shape[-1], n * G, [False, True, True])
    out = {}
    if h.weight:
        out[h.weight] = w.reshape(-1, B, C).sum(0)
    if h.bias:
        out[h.bias] = b.reshape(-1, B, C).sum(0)
    return out


def _layernorm(m: nn.LayerNorm, h, x, dy, B, state=None):
    shape = tuple(m.normalized_shape)
    out = {}
    if h.weight:
        xhat = F.layer_norm(x, shape, eps=m.eps)
        out[h.weight] = (dy * xhat).reshape(-1, B, *shape).sum(0)
    if h.bias:
        out[h.bias] = dy.reshape(-1, B, *shape).sum(0)
    return out


def _embedding(m: nn.Embedding, h, x, dy, B, state=None):
    D = dy.shape[-1]
    idx = x.reshape(-1, B, x[0].numel()).transpose(0, 1).reshape(B, -1)
    gs = dy.reshape(-1, B, dy[0].numel()).transpose(0, 1).reshape(B, -1, D)
    w = gs.new_zeros((B, m.num_embeddings, D))
    w.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, D), gs)
    if m.padding_idx is not None:
        w[:, m.padding_idx] = 0
    return {h.weight: w} if h.weight else {}


# Each takes (module, layer, x, dy, B, state); ``state`` is what the forward hook kept for
# the layer (a GroupNorm's mean and rstd, see group_stats), None for the other kinds.
_EXACT = {"linear": _linear, "conv2d": _conv2d, "groupnorm": _groupnorm,
          "layernorm": _layernorm, "embedding": _embedding}


def _kron_linear(m: nn.Linear, layer: KronLayer, a_out, a_in, x, dy, B) -> torch.Tensor:
    xs, gs = _per_example(x, B), _per_example(dy, B)
    xp = xs @ a_in[:, : layer.d_in].T  # [B, S, k_in]
    if layer.bias is not None:
        xp = xp + a_in[:, layer.d_in]
    return torch.bmm((gs @ a_out.T).transpose(1, 2), xp)  # [B, k_out, k_in]


def _kron_conv2d(m: nn.Conv2d, layer: KronLayer, a_out, a_in, x, dy, B) -> torch.Tensor:
    K, L = x.shape[0] // B, dy.shape[2] * dy.shape[3]
    kernel = a_in[:, : layer.d_in].reshape(-1, *m.weight.shape[1:])
    xp = F.conv2d(x, kernel, None, m.stride, _padding(m), m.dilation)  # [N, k_in, H', W']
    xp = xp.reshape(K, B, -1, L)
    if layer.bias is not None:
        xp = xp + a_in[:, layer.d_in].reshape(1, 1, -1, 1)
    gp = torch.matmul(a_out, dy.reshape(K, B, dy.shape[1], L))  # [K, B, k_out, L]
    return torch.einsum("kbol,kbil->boi", gp, xp)


_KRON = {"linear": _kron_linear, "conv2d": _kron_conv2d}


# --- the taps -------------------------------------------------------------------------------


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands ``(layer input, dy)`` to a sink."""

    @staticmethod
    def forward(ctx, out, anchor, inp, sink):
        ctx.sink = sink
        ctx.save_for_backward(inp)  # autograd's version check: no in-place change after use
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dy):
        (inp,) = ctx.saved_tensors
        # one contiguous copy (when dy is a view, e.g. of an attention block's transpose),
        # shared by the sink and the layer's own backward, which would make its own
        dy = dy.contiguous()
        ctx.sink(inp, dy)
        return dy, dy.new_zeros(()), None, None


class _Sink:
    """Accumulates the per-example contributions of every hooked layer for one output."""

    def __init__(self, B: int, K: int, projector: KronProjector | None) -> None:
        self.B, self.K = B, K
        self.kron = {} if projector is None else {
            layer.weight: (i, layer) for i, layer in enumerate(projector.layers)}
        self.factors = None if projector is None else projector.factors
        self.exact: dict[str, torch.Tensor] = {}
        self.blocks: dict[int, torch.Tensor] = {}

    def _add(self, store: dict, key, value: torch.Tensor) -> None:
        store[key] = value if key not in store else store[key] + value

    def __call__(self, m: nn.Module, h: HookedLayer, x: torch.Tensor, dy: torch.Tensor,
                 state=None) -> None:
        if dy.shape[0] != self.B * self.K:
            raise ValueError(
                f"layer {h.module!r} saw a batch of {dy.shape[0]} rows, expected B*K = "
                f"{self.B * self.K}: the hook engine needs the batch on dim 0 of every hooked "
                "layer; use attribution.gradients = 'vmap' for this model")
        rest = h
        if h.weight in self.kron:
            i, layer = self.kron[h.weight]
            a_out, a_in = (a.to(dy) for a in self.factors[i])
            self._add(self.blocks, i, _KRON[h.kind](m, layer, a_out, a_in, x, dy, self.B))
            rest = HookedLayer(h.module, h.kind, None, None)  # the bias is in the block
        if rest.weight or rest.bias:
            for name, g in _EXACT[h.kind](m, rest, x, dy, self.B, state).items():
                self._add(self.exact, name, g)


@contextlib.contextmanager
def _taps(module: nn.Module, layers: list[HookedLayer], anchor: torch.Tensor,
          sink: Callable[[], _Sink]) -> Iterator[None]:
    """Forward hooks tapping every layer of ``layers``; ``sink()`` is the current sink."""
    modules = dict(module.named_modules())

    def hook(m, args, kwargs, out, h):
        inp = args[0] if args else next(iter(kwargs.values()))
        state = group_stats(out) if h.kind == "groupnorm" else None
        return _Tap.apply(out, anchor, inp, lambda x, dy: sink()(m, h, x, dy, state))

    handles = [modules[h.module].register_forward_hook(partial(hook, h=h), with_kwargs=True)
               for h in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the engine -----------------------------------------------------------------------------


@full_float32()  # forward and backwards without TF32, as the reference engine
def hook_gradients(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    outputs: Sequence[str],
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
    projector: KronProjector | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example gradients of several output functions from one batched forward.

    Arguments as :func:`~dtrak.gradients.per_sample_gradients_multi`, which it equals
    output by output to float rounding (tested in float64); one backward per output.

    Args:
        projector: a :class:`~dtrak.projection.KronProjector` built on this model's layout:
            return its features instead of the gradients (never materialised).
        out: a buffer ``[len(outputs), B, p]`` to write the gradients into (without
            ``projector``). A caller that featurizes block after block passes the same one
            each time: a fresh ``B x p`` array costs a page fault per 4 KiB page, on CPU as
            much time as the model's weight gradients of a small UNet.

    Returns:
        Tensor ``[len(outputs), B, p]`` in the model's dtype (layout
        :func:`~dtrak.gradients.param_order`), or ``[len(outputs), B, k]`` float32 with
        ``projector``.
    """
    if not outputs:
        raise ValueError("hook_gradients needs at least one output function")
    module = adapter.module
    device, dtype = _module_device_dtype(module)
    order = param_order(module, selected_parameters(adapter, param_names))
    if projector is not None and [n for n, _ in projector.order] != [n for n, _ in order]:
        raise ValueError("the kron projector was built for other parameters than those "
                         "differentiated; build it from this model's param_order")
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    fns = [get_output(o) for o in outputs]
    layers, uncovered = hook_plan(module, order)
    B, K = x0k.shape[:2]

    # 1. One batched forward over the B*K noisy inputs (example-major), layers tapped.
    selected = {n for n, _ in order}
    pb = {n: (p.detach().requires_grad_(True) if n in selected else p.detach())
          for n, p in module.named_parameters()}
    pb.update({n: b.detach() for n, b in module.named_buffers()})
    anchor = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
    current: list[_Sink] = [_Sink(B, K, projector)]
    # rows k B + b (timestep-major, see the module)
    epsf, tf = eps.transpose(0, 1).reshape(B * K, *eps.shape[2:]), t.repeat_interleave(B)
    condf = {n: v.repeat(K, *([1] * (v.dim() - 1))) for n, v in cond.items()}
    with eval_mode(module), torch.enable_grad(), _taps(module, layers, anchor,
                                                       lambda: current[0]):
        x0f = x0k.transpose(0, 1).reshape(B * K, *x0k.shape[2:])
        x_t = add_noise(x0f, epsf, tf, sched.alphas_cumprod)
        pred = adapter.eps(pb, x_t, tf, condf)

    # 2. One backward per output function, of sum_b mean_k f (each row: its example's 1/K).
    sinks = []
    for j, fn in enumerate(fns):
        current[0] = _Sink(B, K, projector)
        total = fn(pred, epsf, tf, sched).reshape(K, B).mean(0).sum()
        torch.autograd.grad(total, anchor, retain_graph=j < len(fns) - 1, allow_unused=True)
        sinks.append(current[0])

    # 3. Parameters no hook covers: from the reference path (same noise and timesteps).
    fallback = None
    if uncovered:
        log.warning("hook engine: %d parameter(s) no hook covers (%s%s) come from the vmap "
                    "path", len(uncovered), ", ".join(uncovered[:5]),
                    " ..." if len(uncovered) > 5 else "")
        fallback = per_sample_gradients_multi(adapter, x0, ids, list(outputs), timesteps,
                                              sched, noise_seed, cond=cond,
                                              param_names=uncovered)
    unc_order = param_order(module, uncovered) if uncovered else []

    # 4. Assemble: the flat layout (written into ``out``), or the projector's features.
    rests = [None] * len(fns) if fallback is None else list(fallback)
    if projector is None:
        out = _buffer(out, (len(fns), B, sum(n for _, n in order)), dtype, device)
        for sink, rest, row in zip(sinks, rests, out, strict=True):
            _assemble(sink, order, unc_order, rest, B, None, dtype, device, out=row)
    else:
        out = torch.stack([_assemble(sink, order, unc_order, rest, B, projector, dtype, device)
                           for sink, rest in zip(sinks, rests, strict=True)])
    check_finite(out.reshape(len(fns) * B, -1), list(ids) * len(fns))
    return out


def _buffer(out: torch.Tensor | None, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be a {dtype} tensor {list(shape)} on {device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def _assemble(sink: _Sink, order, unc_order, fallback: torch.Tensor | None, B: int,
              projector: KronProjector | None, dtype, device,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """One output's ``[B, p]`` gradients (into ``out``), or its ``[B, k]`` kron features."""
    exact = dict(sink.exact)
    at = 0
    for name, numel in unc_order:
        exact[name] = fallback[:, at : at + numel]
        at += numel
    sizes = dict(order)

    def flat(name: str) -> torch.Tensor:
        g = exact.get(name)
        return (torch.zeros((B, sizes[name]), dtype=dtype, device=device) if g is None
                else g.reshape(B, -1))

    if projector is None:
        return torch.cat([flat(n) for n, _ in order], dim=1, out=out)
    blocks = [sink.blocks.get(i, torch.zeros((B, ko, ki), dtype=dtype, device=device))
              for i, (ko, ki) in enumerate(projector.dims)]
    rest = (torch.cat([flat(n) for n in projector.rest_names], dim=1).float()
            if projector.rest_names else None)
    return projector.assemble(blocks, rest)
