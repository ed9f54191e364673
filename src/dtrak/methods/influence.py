"""Influence functions with K-FAC and EK-FAC curvature: ``kfac-if`` and ``ekfac-if``.

``tau(q, i) = grad m(q)^T (G + lam I)^-1 grad L(x_i)`` (SPEC section 8.3), built on
kronfluence 1.0.1 (``pip install --no-deps kronfluence==1.0.1 einconv`` plus the
``influence`` extra; imported only when one of these methods runs).

- Measurement m and training loss L: L_Simple of one (t, eps) draw, sum-reduced,
  ``sum (eps_theta(x_t, t) - eps)^2``, averaged over draws (below).
- G: the GGN of the model. The Hessian of the sum-reduced squared error w.r.t. the output is
  2I; G is estimated as a Monte-Carlo Fisher with one target per row sampled from the model,
  ``pred.detach() + sqrt(0.5) z`` (so ``E[g g^T] = J^T 2I J``), and approximated per layer by
  K-FAC-expand: activation covariance over rows x positions (spatial positions of a
  convolution, tokens of an attention projection) times the output-gradient covariance
  summed over positions and averaged over rows. kronfluence divides the gradient
  covariance by rows x positions, so its K-FAC eigenvalues are multiplied here by the
  positions per row; its EK-FAC eigenvalues (the Fisher's diagonal in the Kronecker
  eigenbasis, one per-row gradient each) need no change. ``ekfac-if`` uses the corrected
  eigenvalues, ``kfac-if`` the Kronecker products of the factors' eigenvalues.
- Layers: every ``nn.Linear`` and ``nn.Conv2d`` (exact types: kronfluence wraps no subclass)
  whose weight is among the adapter's attributed parameters, with its bias (kronfluence
  appends a constant 1 to the layer input). Every other parameter is left out of both the
  gradients and G: GroupNorm / LayerNorm scales and shifts, embedding tables (the class
  embedding of a conditional UNet), and parameters of other layer types.
- Draws: row (i, r) of a set is example i with its own t ~ U{0..T-1}, eps and Fisher sample
  z from a generator seeded by ``(influence.seed, stream, i, r)`` (:func:`row_draw`), so no
  result depends on the batch size or order. ``factor_draws`` rows per training example fit
  G (stream ``factors``), ``train_draws`` rows per training example and ``target_draws`` per
  target give the gradients (stream = the set's name): an example's gradient is that of its
  mean loss over its draws (:meth:`Influence.mean_gradient`). tau is bilinear, so this
  equals the mean of tau over all pairs of draws. No h-flip augmentation.
- Damping: ``lam`` is added to every eigenvalue. Its scale (:func:`mean_eigenvalue`) is the
  mean eigenvalue of the fitted curvature over all layers (kronfluence's heuristic damping
  is 0.1 times a layer's mean eigenvalue; here one scale for the whole model), and the prior
  is 0.1 times it; the LDS stage chooses lam on the relative grid around it.
- Sign: up-weighting training example i by e changes the target's loss by about -e tau, so
  a positive tau lowers it: positive = helps, as for ``trak``.

Scoring over a lambda grid: kronfluence preconditions the gradients for one damping value
per pass over the data, so each lambda would cost a gradient pass. Instead kronfluence fits
the factors (covariances, eigendecomposition, eigenvalue correction) and this module rotates
each example's draw-averaged per-layer gradient into the Kronecker eigenbasis once,
``Q_G^T dW Q_A``, and stores it; ``tau = sum_k q_k g_k / (Lambda_k + lam)`` is then one
scaled matrix product per lambda, and both methods share the rotated gradients (K-FAC and
EK-FAC have the same eigenbasis).

Files, under ``feature_dir("full", "train", "influence-f<factor_draws>-s<seed>")``:
``meta.json`` (what the factors were made from: model and training-image digests, draws,
layers); ``covariance.safetensors``, ``eigen.safetensors`` and ``ekfac.safetensors``
(kronfluence's factors, written once, atomically, each with a digest of its tensors checked
on every load: a damaged file is refused with the path to delete); ``grads-<set>-d<draws>``
(feature stores of the rotated gradients ``[n, P]``, resumable per example).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from functools import partial
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..artefacts import DamagedArtefactError, digest, save_json
from ..families import DiffusionAdapter
from ..noise import add_noise
from ..seeding import seed_from
from ..store import FeatureStore
from .base import Context, Method

log = logging.getLogger(__name__)

__all__ = ["METHODS", "STRATEGIES", "DiffusionTask", "Influence", "influence", "influence_dir",
           "mean_eigenvalue", "row_draw", "scores", "tracked_modules"]

STRATEGIES = ("kfac", "ekfac")
INSTALL = ("the kfac-if and ekfac-if methods need kronfluence: `pip install --no-deps "
           "kronfluence==1.0.1 einconv` and `pip install 'dtrak[influence]'` (no deps: its "
           "metadata asks for torchvision, whose wheel would replace the installed torch)")
# kronfluence's factor names (kronfluence.utils.constants)
COVARIANCE = ("activation_covariance", "gradient_covariance",
              "num_activation_covariance_processed", "num_gradient_covariance_processed")
EIGEN = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors",
         "gradient_eigenvalues")
EKFAC = ("lambda_matrix", "num_lambda_processed")
PRIOR = 0.1  # prior damping relative to the mean eigenvalue (kronfluence's heuristic)
_SIGN = ("positive = helps: tau = grad m(target)^T (G + lam I)^-1 grad L(z), and "
         "up-weighting z by e changes the target's loss by about -e tau")


def _kronfluence() -> SimpleNamespace:
    """The kronfluence functions used here (imported on first use: an optional extra)."""
    try:
        import kronfluence
        from kronfluence.analyzer import prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.factor.covariance import fit_covariance_matrices_with_loader
        from kronfluence.factor.eigen import (
            fit_lambda_matrices_with_loader,
            perform_eigendecomposition,
        )
        from kronfluence.utils.state import State
    except ImportError as e:
        raise ImportError(INSTALL) from e
    return SimpleNamespace(
        version=kronfluence.__version__, prepare_model=prepare_model,
        FactorArguments=FactorArguments, covariance=fit_covariance_matrices_with_loader,
        eigen=perform_eigendecomposition, ekfac=fit_lambda_matrices_with_loader, State=State)


# ----------------------------------------------------------------------------- rows


def row_draw(seed: int, stream: str, i: int, r: int, shape: tuple[int, ...], T: int
             ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(t, eps, z)`` of row (i, r) of ``stream``: t ~ U{0..T-1}, the noise eps and the
    Fisher sample z, both N(0, I) of ``shape`` (float32), from one generator seeded by
    ``(seed, stream, i, r)``: a pure function of its arguments."""
    gen = torch.Generator().manual_seed(seed_from(seed, "influence", stream, i, r))
    t = int(torch.randint(T, (1,), generator=gen))
    eps = torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen)
    return t, eps, z


class DiffusionTask:
    """kronfluence's ``Task`` for L_Simple on the rows of one stream.

    A batch is a LongTensor of row numbers k (example ``k // draws``, draw ``k % draws``).
    The methods and argument names are those of ``kronfluence.task.Task``, which kronfluence
    only calls; it is not subclassed so that importing this module needs no kronfluence.
    """

    enable_post_process_per_sample_gradient = False

    def __init__(self, adapter: DiffusionAdapter, examples, ctx: Context, stream: str,
                 draws: int, modules: list[str] | None = None) -> None:
        self.adapter, self.examples, self.stream, self.draws = adapter, examples, stream, draws
        self.modules = modules
        self.seed, self.sched, self.placement = ctx.cfg.influence.seed, ctx.sched, ctx.placement

    def inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(x_t, t, eps, z, cond)`` of the rows ``batch``, on the run's device."""
        rows = batch.cpu().tolist()
        ids = [k // self.draws for k in rows]
        x0, cond = self.adapter.prepare(self.examples[torch.as_tensor(ids)])
        shape = tuple(x0.shape[1:])
        drawn = [row_draw(self.seed, self.stream, i, k % self.draws, shape, self.sched.T)
                 for i, k in zip(ids, rows, strict=True)]
        dev, dt = self.placement.device, self.placement.dtype
        t = torch.tensor([d[0] for d in drawn], device=dev)
        eps, z = (torch.stack([d[j] for d in drawn]).to(dev, dt) for j in (1, 2))
        cond = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev)
                for k, v in cond.items()}
        x_t = add_noise(x0.to(dev, dt), eps, t, self.sched.alphas_cumprod)
        return x_t, t, eps, z, cond

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        """Sum over rows of ``sum (pred - target)^2``: target eps, or with ``sample`` one
        drawn from the model, ``pred.detach() + sqrt(0.5) z`` (the Fisher of the GGN)."""
        x_t, t, eps, z, cond = self.inputs(batch)
        pred = self.adapter.predict(x_t, t, cond)
        target = pred.detach() + math.sqrt(0.5) * z if sample else eps
        return (pred - target).pow(2).sum()

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.modules

    def get_attention_mask(self, batch):
        return None

    def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor):
        return gradient


# ----------------------------------------------------------------------------- layers


def tracked_modules(adapter: DiffusionAdapter) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` layers whose weight is attributed."""
    names = adapter.attributed_parameters()
    if names is None:
        names = [n for n, p in adapter.module.named_parameters() if p.requires_grad]
    names = set(names)
    return [n for n, m in adapter.module.named_modules()
            if n and type(m) in (nn.Linear, nn.Conv2d) and f"{n}.weight" in names]


def _used_once(task: DiffusionTask, names: list[str]) -> list[str]:
    """The layers among ``names`` that one forward pass calls (once each, else an error)."""
    calls = dict.fromkeys(names, 0)

    def count(name, *_):
        calls[name] += 1

    module = task.adapter.module
    hooks = [module.get_submodule(n).register_forward_hook(partial(count, n)) for n in names]
    try:
        with torch.no_grad():
            task.compute_train_loss(torch.tensor([0]), module)
    finally:
        for h in hooks:
            h.remove()
    shared = [n for n, c in calls.items() if c > 1]
    if shared:
        raise ValueError(f"layers called more than once in a forward pass ({', '.join(shared)})"
                         ": the K-FAC influence methods need each Linear / Conv2d used once")
    return [n for n, c in calls.items() if c == 1]


def _examples_digest(examples) -> str:
    """A digest of a set's examples (an image tensor, or the tensors of a labelled set)."""
    if isinstance(examples, torch.Tensor):
        return digest(examples.cpu())
    return digest(*(v.cpu() for v in vars(examples).values() if isinstance(v, torch.Tensor)))


# ----------------------------------------------------------------------------- factor files


def _save_factors(path: Path, factors: dict[str, dict[str, torch.Tensor]]) -> None:
    """kronfluence's ``{factor: {layer: tensor}}`` as one safetensors file, written to a
    temporary name and renamed; its metadata holds a digest of the tensors."""
    flat = {f"{f}/{m}": t.detach().cpu().contiguous() for f, d in factors.items()
            for m, t in d.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(flat, str(tmp), metadata={"digest": _tensors_digest(flat)})
    tmp.replace(path)


def _tensors_digest(flat: dict[str, torch.Tensor]) -> str:
    return digest(*chain.from_iterable((k, flat[k]) for k in sorted(flat)))


def _load_factors(path: Path, names: tuple[str, ...], modules: list[str]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """A factor file written by :func:`_save_factors`, checked: readable, its digest right,
    every factor of every layer present; otherwise an error naming the file to delete."""
    def damaged(what: str) -> DamagedArtefactError:
        return DamagedArtefactError(f"{path} is damaged ({what}); delete it and score again "
                                    "to recompute it")

    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("digest")
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise damaged(f"unreadable: {e}") from e
    missing = [f"{n}/{m}" for n in names for m in modules if f"{n}/{m}" not in flat]
    if missing:
        raise damaged(f"it holds no {missing[0]}")
    if saved != _tensors_digest(flat):
        raise damaged("its tensors do not match the digest written with them")
    return {n: {m: flat[f"{n}/{m}"] for m in modules} for n in names}


# ----------------------------------------------------------------------------- the fit


def influence_dir(ctx: Context) -> Path:
    """Where the factors and rotated gradients of a run's full model live."""
    c = ctx.cfg.influence
    return Path(ctx.feature_dir("full", "train", f"influence-f{c.factor_draws}-s{c.seed}"))


class Influence:
    """The fitted curvature of the full model, and the rotated gradients of each set.

    Holds a copy of the full model with kronfluence's layer wrappers (the context's model is
    left as it is). Factor files are computed when missing and reused otherwise.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.kf, self.dir = ctx, _kronfluence(), influence_dir(ctx)
        self.rows = len(ctx.train) * ctx.cfg.influence.factor_draws
        self._wrap(ctx.adapter("full"))
        self._check_meta()
        self.covariance = self._factors("covariance", COVARIANCE, self._fit_covariance)
        self.eigen = self._factors("eigen", EIGEN, self._eigendecomposition)
        dev, dt = ctx.placement.device, ctx.placement.dtype
        self.basis = [(self.eigen["gradient_eigenvectors"][m].to(dev, dt),
                       self.eigen["activation_eigenvectors"][m].to(dev, dt))
                      for m in self.modules]
        self._ekfac = None
        self._eigenvalues: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    def _wrap(self, base: DiffusionAdapter) -> None:
        """A copy of the model with kronfluence's wrappers on the layers that one forward
        pass calls among :func:`tracked_modules`."""
        self.model_digest = digest(*base.module.state_dict().values())
        self.adapter = copy.deepcopy(base)
        self.factor_task = DiffusionTask(self.adapter, self.ctx.train, self.ctx, "factors",
                                         self.ctx.cfg.influence.factor_draws)
        self.modules = _used_once(self.factor_task, tracked_modules(base))
        self.factor_task.modules = self.modules
        self.kf.prepare_model(self.adapter.module, self.factor_task)
        self.args = self._factor_args()

    def _factor_args(self):
        dt = self.ctx.placement.dtype  # factors in the model's dtype, eigh in float64
        return self.kf.FactorArguments(
            strategy="ekfac", use_empirical_fisher=False, covariance_max_examples=None,
            lambda_max_examples=None, activation_covariance_dtype=dt,
            gradient_covariance_dtype=dt, per_sample_gradient_dtype=dt, lambda_dtype=dt,
            eigendecomposition_dtype=torch.float64)

    def _check_meta(self) -> None:
        """Write ``meta.json``, or refuse factors made from another model or settings."""
        c = self.ctx.cfg.influence
        meta = {"model": self.model_digest, "train": _examples_digest(self.ctx.train),
                "n_train": len(self.ctx.train), "factor_draws": c.factor_draws,
                "seed": c.seed, "dtype": str(self.ctx.placement.dtype),
                "modules": self.modules, "kronfluence": self.kf.version}
        path = self.dir / "meta.json"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            save_json(path, meta)
            return
        saved = json.loads(path.read_text())
        diff = [k for k in sorted(set(saved) | set(meta)) if saved.get(k) != meta.get(k)]
        if diff:
            raise ValueError(f"{self.dir} holds influence factors made from something else "
                             f"({', '.join(diff)} differ); delete {self.dir} to recompute them")

    def _factors(self, name: str, names: tuple[str, ...], compute):
        path = self.dir / f"{name}.safetensors"
        if path.exists():
            return _load_factors(path, names, self.modules)
        t0 = time.time()
        with warnings.catch_warnings():  # kronfluence builds a torch.cuda.amp.GradScaler
            warnings.filterwarnings("ignore", message=".*GradScaler.*")
            factors = compute()
        _save_factors(path, {n: factors[n] for n in names})
        log.info("influence: %s fitted in %.1f s (%d rows)", name, time.time() - t0, self.rows)
        return _load_factors(path, names, self.modules)

    def _loader(self):
        return torch.utils.data.DataLoader(list(range(self.rows)),
                                           batch_size=self.ctx.cfg.influence.batch_size)

    def _fit_covariance(self):
        return self.kf.covariance(
            model=self.adapter.module, state=self.kf.State(), task=self.factor_task,
            loader=self._loader(), factor_args=self.args, tracked_module_names=self.modules,
            disable_tqdm=not self.ctx.progress)[1]

    def _eigendecomposition(self):
        return self.kf.eigen(covariance_factors=self.covariance, model=self.adapter.module,
                             state=self.kf.State(), factor_args=self.args, disable_tqdm=True)

    def _fit_ekfac(self):
        return self.kf.ekfac(
            model=self.adapter.module, state=self.kf.State(), task=self.factor_task,
            loader=self._loader(), factor_args=self.args, eigen_factors=self.eigen,
            tracked_module_names=self.modules, disable_tqdm=not self.ctx.progress)[1]

    # ------------------------------------------------------------------ eigenvalues
    def eigenvalues(self, strategy: str) -> torch.Tensor:
        """``[P]`` float64 eigenvalues of the curvature in the Kronecker eigenbasis, layer
        after layer in the order of the rotated gradients (clipped at 0: eigh of a
        covariance may return -1e-12)."""
        if strategy not in self._eigenvalues:
            per_layer = [self._layer_eigenvalues(strategy, m) for m in self.modules]
            self._eigenvalues[strategy] = torch.cat([v.flatten() for v in per_layer]
                                                    ).clamp_min(0.0)
        return self._eigenvalues[strategy]

    def _layer_eigenvalues(self, strategy: str, m: str) -> torch.Tensor:
        if strategy == "kfac":
            # kronfluence averages the gradient covariance over rows x positions; K-FAC-expand
            # sums over a row's positions: times the positions per row
            positions = float(self.covariance["num_gradient_covariance_processed"][m]) / self.rows
            e = self.eigen
            return torch.outer(e["gradient_eigenvalues"][m].double(),
                               e["activation_eigenvalues"][m].double()) * positions
        if strategy == "ekfac":
            lam = self.ekfac()
            return lam["lambda_matrix"][m].double() / float(lam["num_lambda_processed"][m])
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")

    def ekfac(self) -> dict[str, dict[str, torch.Tensor]]:
        """kronfluence's eigenvalue correction (fitted on first use)."""
        if self._ekfac is None:
            self._ekfac = self._factors("ekfac", EKFAC, self._fit_ekfac)
        return self._ekfac

    # ------------------------------------------------------------------ gradients
    def gradients(self, set_name: str) -> torch.Tensor:
        """``[n, P]`` draw-averaged loss gradients of a set, rotated into the eigenbasis, on
        the run's device (computed into a resumable store when missing)."""
        if set_name not in self._grads:
            c = self.ctx.cfg.influence
            draws = c.train_draws if set_name == "train" else c.target_draws
            store = self._store(set_name, draws)
            task = DiffusionTask(self.adapter, self.ctx.examples(set_name), self.ctx, set_name,
                                 draws, self.modules)
            todo, t0 = store.missing(), time.time()
            per_chunk = max(1, c.batch_size // draws)  # whole examples, about a batch of rows
            for start in tqdm(range(0, len(todo), per_chunk), desc=f"influence {set_name}",
                              disable=not self.ctx.progress or not len(todo)):
                ids = todo[start:start + per_chunk]
                store.write(ids, self._rotated(task, ids).cpu().float().numpy())
            if len(todo):
                log.info("influence: %s gradients of %d rows in %.1f s", set_name,
                         len(todo) * draws, time.time() - t0)
            p = self.ctx.placement
            self._grads[set_name] = torch.from_numpy(store.load()).to(p.device, p.dtype)
        return self._grads[set_name]

    def _store(self, set_name: str, draws: int) -> FeatureStore:
        examples = self.ctx.examples(set_name)
        size = sum(q_g.shape[0] * q_a.shape[0] for q_g, q_a in self.basis)
        meta = {"set": set_name, "draws": draws, "seed": self.ctx.cfg.influence.seed,
                "examples": _examples_digest(examples), "model": self.model_digest,
                "basis": _tensors_digest({f"{n}/{m}": self.eigen[n][m] for n in EIGEN
                                          for m in self.modules})}
        return FeatureStore(self.dir / f"grads-{set_name}-d{draws}", len(examples), size, meta)

    def _rotated(self, task: DiffusionTask, ids: np.ndarray) -> torch.Tensor:
        """``[len(ids), P]``: each example's mean gradient over its draws, ``Q_G^T dW Q_A``
        per layer."""
        return torch.stack([
            torch.cat([(q_g.T @ g @ q_a).flatten()
                       for g, (q_g, q_a) in zip(self.mean_gradient(task, int(i)), self.basis,
                                                strict=True)])
            for i in ids])

    def mean_gradient(self, task: DiffusionTask, i: int) -> list[torch.Tensor]:
        """Example i's loss gradient averaged over its draws, per layer ``[out, in (+1)]`` in
        kronfluence's layout (weight ``[out, in * kh * kw]``, the bias as a last column).

        Plain autograd on the example's rows, in batches of at most ``influence.batch_size``:
        the mean over draws is the gradient of the mean loss, so no per-row gradient is
        formed (kronfluence's per-row gradients of a convolution unfold its input into
        patches, several times slower on a CPU than the convolution's own backward).
        """
        rows = torch.arange(i * task.draws, (i + 1) * task.draws)
        params = [p for m in self.modules for p in self._layer_params(m)]
        total = [torch.zeros_like(p) for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            for batch in rows.split(self.ctx.cfg.influence.batch_size):
                loss = task.compute_train_loss(batch, self.adapter.module) / task.draws
                for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                    t += g
        finally:
            for p in params:
                p.requires_grad_(False)
        grads = iter(total)
        return [self._layout(m, grads) for m in self.modules]

    def _layer_params(self, m: str) -> list[torch.Tensor]:
        layer = self.adapter.module.get_submodule(m).original_module
        return [layer.weight] + ([layer.bias] if layer.bias is not None else [])

    def _layout(self, m: str, grads) -> torch.Tensor:
        """The next gradients of ``grads`` (weight, then bias if any) as ``[out, in (+1)]``."""
        w = next(grads)
        w = w.reshape(w.shape[0], -1)
        if self.adapter.module.get_submodule(m).original_module.bias is None:
            return w
        return torch.cat([w, next(grads)[:, None]], dim=1)


# ----------------------------------------------------------------------------- the methods


def influence(ctx: Context) -> Influence:
    """The run's :class:`Influence` (one per context and factor settings)."""
    return ctx.memo(("influence", influence_dir(ctx).name), lambda: Influence(ctx))


def mean_eigenvalue(ctx: Context, strategy: str) -> float:
    """The mean eigenvalue of the fitted curvature over all layers' parameters: the scale of
    the damping lambda."""
    return float(influence(ctx).eigenvalues(strategy).mean())


def scores(ctx: Context, set_name: str, lam: float | None, strategy: str) -> np.ndarray:
    """``[T, N]`` float64 influence scores of a target set (``lam``: the damping; None: 0.1
    times the mean eigenvalue).

    The rotated gradients and eigenvalues are kept in the context, so a sweep over lambda
    costs one ``[T, P] x [P, N]`` product per value: ``G + lam I`` is diagonal in the
    Kronecker eigenbasis, ``tau = sum_k q_k g_k / (Lambda_k + lam)``.
    """
    inf = influence(ctx)
    ev = inf.eigenvalues(strategy)
    lam = PRIOR * float(ev.mean()) if lam is None else float(lam)
    weights = (1.0 / (ev + lam)).to(ctx.placement.device, ctx.placement.dtype)
    q, g = inf.gradients(set_name), inf.gradients("train")
    return ((q * weights) @ g.T).double().cpu().numpy()


def _method(strategy: str, description: str) -> Method:
    def score(ctx: Context, set_name: str, lam: float | None) -> np.ndarray:
        return scores(ctx, set_name, lam, strategy)

    return Method(f"{strategy}-if", description, _SIGN, score, uses_lambda=True,
                  lambda_scale=partial(mean_eigenvalue, strategy=strategy), lambda_prior=PRIOR,
                  config=("influence",))


METHODS = (
    _method("ekfac", "influence function, EK-FAC GGN (kronfluence), L_Simple"),
    _method("kfac", "influence function, K-FAC GGN (kronfluence), L_Simple"),
)
