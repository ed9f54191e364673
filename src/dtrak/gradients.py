"""Per-sample gradient features: the only module that vectorises with ``torch.func``.

For an example ``z`` with clean sample ``x0`` the feature is

    g(z) = (1/K) sum_k grad_theta f(eps_theta(x_t_k, t_k), eps_k, t_k),
    x_t_k = sqrt(abar_{t_k}) x0 + sqrt(1 - abar_{t_k}) eps_k,

with ``eps_k = noise.example_noise(noise_seed, [z], K, ...)[0, k]`` (a pure function of the
seed, the example id and ``k``) and ``f`` an output function of :mod:`dtrak.outputs`.

Layout: ``g`` is flattened parameter by parameter in the order of
``module.named_parameters()`` restricted to the selected names (:func:`param_order`), each
parameter flattened row-major; ``p`` is the sum of their sizes.

Vectorisation: ``vmap(grad(per_example))`` over examples, where ``per_example`` runs ONE
forward over the example's ``K`` noisy copies (the model sees a batch of ``K``) and returns
the mean of ``f`` over them. Scaled-dot-product attention is pinned to PyTorch's MATH backend
while featurizing: the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward) has no vmap batching rule, so vmap would run it in a per-example loop and warn,
whereas the MATH backend is composed of matmul/softmax ops that vmap batches. The model's
attention processors are left untouched (any processor calling ``F.scaled_dot_product_attention``
benefits, e.g. diffusers' ``AttnProcessor2_0`` in UNet2DModel and UNet2DConditionModel).

:func:`reference_gradients` is the oracle: a plain loop of one ``autograd.grad`` per example,
with the default attention kernel, optionally in float64.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch.func import grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .families.base import Cond, DiffusionAdapter
from .noise import ScheduleConstants, add_noise, as_example_ids, example_noise
from .outputs import OutputFunction, get_output

__all__ = [
    "check_finite",
    "eval_mode",
    "featurization_mode",
    "flatten_grads",
    "full_float32",
    "output_values",
    "param_order",
    "per_sample_gradients",
    "per_sample_gradients_multi",
    "per_sample_unit_gradients",
    "per_timestep_gradients",
    "reference_gradients",
    "selected_parameters",
]

log = logging.getLogger(__name__)


# --- parameter layout ---------------------------------------------------------------------


def param_order(
    model: torch.nn.Module, param_names: Sequence[str] | None = None
) -> list[tuple[str, int]]:
    """The fixed flattening order ``[(name, numel), ...]`` of the gradient features.

    ``param_names=None`` selects every parameter with ``requires_grad=True``. Names follow
    ``model.named_parameters()`` order whatever order ``param_names`` lists them in.
    """
    named = list(model.named_parameters())
    if param_names is None:
        wanted = {n for n, p in named if p.requires_grad}
        if not wanted:
            raise ValueError(
                "the model has no parameter with requires_grad=True; pass param_names or "
                "unfreeze the parameters to differentiate"
            )
    else:
        wanted = set(param_names)
        unknown = sorted(wanted - {n for n, _ in named})
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                "see model.named_parameters() for valid names"
            )
        if not wanted:
            raise ValueError("param_names is empty; pass None to use all trainable parameters")
    return [(n, p.numel()) for n, p in named if n in wanted]


def selected_parameters(adapter: DiffusionAdapter, param_names: Sequence[str] | None = None
                        ) -> Sequence[str] | None:
    """The parameters to differentiate: ``param_names``, else the family's attributed ones."""
    return param_names if param_names is not None else adapter.attributed_parameters()


def flatten_grads(grads: dict[str, torch.Tensor], order: list[tuple[str, int]]) -> torch.Tensor:
    """Per-example gradients ``{name: [B, *shape]}`` -> ``[B, p]`` in ``order``."""
    first = grads[order[0][0]]
    return torch.cat([grads[n].reshape(first.shape[0], -1) for n, _ in order], dim=1)


def check_finite(grads: torch.Tensor, example_ids: Sequence[int] | torch.Tensor) -> None:
    """Raise ``ValueError`` naming the examples whose gradient ``[B, p]`` has NaN or inf."""
    # A row sum is non-finite iff the row has a NaN/inf (or overflows, which the exact check on
    # the flagged rows then rules out): one cheap pass instead of isfinite's several.
    flagged = (~torch.isfinite(grads.sum(dim=1))).nonzero().flatten()
    if flagged.numel() == 0:
        return
    exact = ~torch.isfinite(grads[flagged]).all(dim=1)
    bad = flagged[exact].tolist()
    if bad:
        ids = as_example_ids(example_ids)
        named = [ids[i] for i in bad]
        raise ValueError(
            f"non-finite (NaN/inf) gradients for example ids {named[:20]}"
            f"{' ...' if len(named) > 20 else ''}; check the model weights and inputs of these "
            "examples (the l2 output has an infinite gradient where the prediction is exactly 0)"
        )


# --- shared preparation -------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; the previous mode is restored after."""
    was_training = module.training
    if was_training:
        log.info("putting the model in eval mode for featurization (restored afterwards)")
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 on CUDA for the duration (the flags are restored after). Features are compared
    across devices to float32 tolerance, and TF32's 10-bit mantissa (cuDNN uses it for
    convolutions by default) would cost about 1e-3 relative error; no effect on the CPU."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextlib.contextmanager
def featurization_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, vmap-friendly (MATH) scaled-dot-product attention and full float32 (no
    TF32) for the duration."""
    with eval_mode(module), sdpa_kernel([SDPBackend.MATH]), full_float32():
        yield


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters(), None)
    if p is None:
        raise ValueError("the model has no parameters")
    return p.device, p.dtype


def _inputs(
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    timesteps: torch.Tensor,
    noise_seed: int,
    cond: Cond | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond, list[int]]:
    """Validated ``x0 [B, K, *event]``, ``eps [B, K, *event]``, ``t [K]``, cond, ids."""
    ids = as_example_ids(example_ids)
    if timesteps.dim() != 1 or timesteps.numel() < 1:
        raise ValueError(
            f"timesteps must be a non-empty LongTensor [K], got shape {tuple(timesteps.shape)}"
        )
    K = timesteps.shape[0]
    if x0.dim() < 2 or x0.shape[0] != len(ids):
        raise ValueError(
            f"x0 has {x0.shape[0] if x0.dim() else 0} examples but {len(ids)} example ids given"
        )
    if x0.dim() == 5:  # [B, K, C, H, W]: one clean sample per timestep (Journey TRAK)
        if x0.shape[1] != K:
            raise ValueError(f"x0 [B, K, C, H, W] has K={x0.shape[1]} but {K} timesteps given")
        x0k = x0
    elif x0.dim() == 4:
        x0k = x0.unsqueeze(1).expand(-1, K, *x0.shape[1:])
    else:
        raise ValueError(f"x0 must be [B, C, H, W] or [B, K, C, H, W], got {tuple(x0.shape)}")
    cond = dict(cond or {})
    for name, value in cond.items():
        if value.shape[0] != len(ids):
            raise ValueError(
                f"cond[{name!r}] has leading dim {value.shape[0]}, expected B={len(ids)}"
            )
    eps = example_noise(noise_seed, ids, K, tuple(x0k.shape[2:]), dtype=dtype).to(device)
    cond = {n: v.to(device) for n, v in cond.items()}
    return x0k.to(device, dtype), eps, timesteps.to(device, torch.long), cond, ids


def _split_params(
    module: torch.nn.Module, order: list[tuple[str, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(differentiated params, everything else: frozen params and buffers), all detached."""
    selected = {n for n, _ in order}
    params, frozen = {}, {}
    for n, p in module.named_parameters():
        (params if n in selected else frozen)[n] = p.detach()
    frozen.update({n: b.detach() for n, b in module.named_buffers()})
    return params, frozen


def _expand_cond(cond: Cond, K: int) -> Cond:
    """Per-example conditioning ``{name: [...]}`` -> ``{name: [K, ...]}``."""
    return {n: v.unsqueeze(0).expand(K, *v.shape) for n, v in cond.items()}


def _mean_output(
    adapter: DiffusionAdapter,
    out_fn: OutputFunction,
    sched: ScheduleConstants,
    params_and_buffers: dict[str, torch.Tensor],
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
) -> torch.Tensor:
    """Mean over the ``K`` timesteps of one example's ``f``: ``x0, eps [K, *event]`` -> scalar."""
    x_t = add_noise(x0, eps, t, sched.alphas_cumprod)
    pred = adapter.eps(params_and_buffers, x_t, t, _expand_cond(cond, t.shape[0]))
    return out_fn(pred, eps, t, sched).mean()


# --- per-sample gradients -----------------------------------------------------------------


def per_sample_gradients(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    output: str,
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Vectorised per-example gradient features.

    Args:
        adapter: the model (:class:`DiffusionAdapter`); put in eval mode for the call.
        x0: clean samples ``[B, C, H, W]``, or ``[B, K, C, H, W]`` for one per timestep.
        example_ids: ``B`` non-negative ids; they seed the noise.
        output: output-function name (:func:`dtrak.outputs.get_output`).
        timesteps: LongTensor ``[K]``.
        sched: schedule constants.
        noise_seed: seed of the per-(example, timestep) noise.
        cond: conditioning ``{name: [B, ...]}``, vmapped alongside the examples.
        param_names: parameters to differentiate (None: all with ``requires_grad``).
        chunk_size: examples per vectorised call (bounds memory; None: all ``B`` at once).

    Returns:
        Tensor ``[B, p]`` in the model's dtype, layout :func:`param_order`.
    """
    module = adapter.module
    device, dtype = _module_device_dtype(module)
    order = param_order(module, selected_parameters(adapter, param_names))
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    out_fn = get_output(output)
    params, frozen = _split_params(module, order)

    def per_example(p, x0_i, eps_i, cond_i):
        return _mean_output(adapter, out_fn, sched, {**frozen, **p}, x0_i, eps_i, t, cond_i)

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the whole batch), got {chunk_size}")
    batched = vmap(grad(per_example), in_dims=(None, 0, 0, 0))
    B = len(ids)
    step = chunk_size or max(B, 1)
    out = torch.empty((B, sum(n for _, n in order)), dtype=dtype, device=device)
    with featurization_mode(module):
        for lo in range(0, B, step):
            sl = slice(lo, min(lo + step, B))
            grads = batched(params, x0k[sl], eps[sl], {n: v[sl] for n, v in cond.items()})
            _write_flat(out[sl], grads, order)
    check_finite(out, ids)
    return out


def per_sample_gradients_multi(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    outputs: Sequence[str],
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Per-example gradients of several output functions from one forward pass.

    Same noise, timesteps and layout as :func:`per_sample_gradients`, which it equals output
    by output (tested); the forward pass through the UNet is shared and the backward passes
    are batched (``jacrev`` over the vector of outputs), so ``n`` outputs cost less than
    ``n`` calls. What the output-function ablation uses.

    Returns:
        Tensor ``[len(outputs), B, p]``.
    """
    if not outputs:
        raise ValueError("per_sample_gradients_multi needs at least one output function")
    module = adapter.module
    device, dtype = _module_device_dtype(module)
    order = param_order(module, selected_parameters(adapter, param_names))
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    fns = [get_output(o) for o in outputs]
    params, frozen = _split_params(module, order)

    def per_example(p, x0_i, eps_i, cond_i):
        x_t = add_noise(x0_i, eps_i, t, sched.alphas_cumprod)
        pred = adapter.eps({**frozen, **p}, x_t, t, _expand_cond(cond_i, t.shape[0]))
        return torch.stack([fn(pred, eps_i, t, sched).mean() for fn in fns])

    batched = vmap(jacrev(per_example), in_dims=(None, 0, 0, 0))
    out = torch.empty((len(fns), len(ids), sum(n for _, n in order)), dtype=dtype,
                      device=device)
    with featurization_mode(module):
        grads = batched(params, x0k, eps, cond)  # {name: [B, n_out, *shape]}
    for j in range(len(fns)):
        _write_flat(out[j], {n: g[:, j] for n, g in grads.items()}, order)
    check_finite(out.reshape(len(fns) * len(ids), -1), list(ids) * len(fns))
    return out


def per_timestep_gradients(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    output: str,
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """The gradient of ``f`` at each of the ``K`` timesteps separately: ``[B, K, p]``.

    Same noise, timesteps and layout as :func:`per_sample_gradients`, whose result is the mean
    of these over ``K`` (tested). Each (example, timestep) is one forward of a batch of one,
    vmapped over timesteps and examples, so the cost is that of :func:`per_sample_gradients`
    and the memory ``B x K x p``.
    """
    module = adapter.module
    device, dtype = _module_device_dtype(module)
    order = param_order(module, selected_parameters(adapter, param_names))
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    out_fn = get_output(output)
    params, frozen = _split_params(module, order)

    def per_row(p, x0_r, eps_r, t_r, cond_i):
        return _mean_output(adapter, out_fn, sched, {**frozen, **p}, x0_r[None], eps_r[None],
                            t_r[None], cond_i)

    over_steps = vmap(grad(per_row), in_dims=(None, 0, 0, 0, None))
    batched = vmap(over_steps, in_dims=(None, 0, 0, None, 0))
    B, K = x0k.shape[:2]
    out = torch.empty((B * K, sum(n for _, n in order)), dtype=dtype, device=device)
    with featurization_mode(module):
        grads = batched(params, x0k, eps, t, cond)  # {name: [B, K, *shape]}
    _write_flat(out, {n: g.reshape(B * K, *g.shape[2:]) for n, g in grads.items()}, order)
    check_finite(out, ids.repeat_interleave(K) if torch.is_tensor(ids)
                 else [i for i in ids for _ in range(K)])
    return out.reshape(B, K, -1)


def per_sample_unit_gradients(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    output: str,
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """``(1/K) sum_k g_k / ||g_k||``: each timestep's gradient scaled to unit L2 norm over
    all attributed parameters before the mean (the features of DAS, :mod:`dtrak.methods.das`).
    A zero gradient stays zero. ``[B, p]``, layout :func:`param_order`."""
    g = per_timestep_gradients(adapter, x0, example_ids, output, timesteps, sched, noise_seed,
                               cond=cond, param_names=param_names)
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return (g / torch.where(norms > 0, norms, torch.ones_like(norms))).mean(dim=1)


def _write_flat(out: torch.Tensor, grads: dict[str, torch.Tensor], order) -> None:
    """Copy ``{name: [b, *shape]}`` into ``out [b, p]`` in ``order`` (no concatenated copy)."""
    offset = 0
    for name, numel in order:
        out[:, offset : offset + numel] = grads[name].reshape(out.shape[0], numel)
        offset += numel


def reference_gradients(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    output: str,
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    param_names: Sequence[str] | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Oracle for :func:`per_sample_gradients`: one plain ``autograd.grad`` per example.

    Same arguments and layout (``chunk_size`` is ignored); ``dtype`` (e.g. ``torch.float64``)
    runs the model with every parameter and buffer cast to it, leaving the module untouched.
    The default attention kernel is used, so agreement also checks the MATH-attention path.

    Returns:
        Tensor ``[B, p]`` in ``dtype`` (default: the model's).
    """
    module = adapter.module
    device, model_dtype = _module_device_dtype(module)
    dtype = dtype or model_dtype
    order = param_order(module, selected_parameters(adapter, param_names))
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    out_fn = get_output(output)
    params, frozen = _split_params(module, order)
    frozen = {n: v.to(dtype) if v.is_floating_point() else v for n, v in frozen.items()}
    rows = []
    with eval_mode(module):
        for b in range(len(ids)):
            leaves = {n: v.to(dtype).clone().requires_grad_(True) for n, v in params.items()}
            value = _mean_output(
                adapter, out_fn, sched, {**frozen, **leaves}, x0k[b], eps[b], t,
                {n: v[b] for n, v in cond.items()},
            )
            g = torch.autograd.grad(value, [leaves[n] for n, _ in order])
            rows.append(torch.cat([x.reshape(-1) for x in g]))
    out = torch.stack(rows)
    check_finite(out, ids)
    return out


# --- output values (no gradient) ----------------------------------------------------------


def output_values(
    adapter: DiffusionAdapter,
    x0: torch.Tensor,
    example_ids: Sequence[int] | torch.Tensor,
    output: str,
    timesteps: torch.Tensor,
    sched: ScheduleConstants,
    noise_seed: int,
    cond: Cond | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """The output function's value at every timestep, no gradient (e.g. LDS ground truth).

    Uses the same noise as :func:`per_sample_gradients`; results do not depend on
    ``batch_size`` (the number of noisy samples per forward pass) beyond float rounding.

    Returns:
        Tensor ``[B, K]`` in the model's dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = adapter.module
    device, dtype = _module_device_dtype(module)
    x0k, eps, t, cond, ids = _inputs(x0, example_ids, timesteps, noise_seed, cond, device, dtype)
    out_fn = get_output(output)
    B, K = x0k.shape[:2]
    # Flatten (example, timestep) pairs, example-major, and run them in forward batches.
    x0f, epsf = x0k.reshape(B * K, *x0k.shape[2:]), eps.reshape(B * K, *eps.shape[2:])
    tf = t.repeat(B)
    condf = {n: v.repeat_interleave(K, dim=0) for n, v in cond.items()}
    pb = {n: p.detach() for n, p in module.named_parameters()}
    pb.update({n: b.detach() for n, b in module.named_buffers()})
    values = []
    with torch.no_grad(), eval_mode(module):  # no vmap here: the fused attention kernel is fine
        for lo in range(0, B * K, batch_size):
            sl = slice(lo, lo + batch_size)
            x_t = add_noise(x0f[sl], epsf[sl], tf[sl], sched.alphas_cumprod)
            pred = adapter.eps(pb, x_t, tf[sl], {n: v[sl] for n, v in condf.items()})
            values.append(out_fn(pred, epsf[sl], tf[sl], sched))
    return torch.cat(values).reshape(B, K)
